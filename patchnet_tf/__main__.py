import sys

from patchnet_tf.cli import main

sys.exit(main())
