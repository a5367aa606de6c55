import sys

from patchnet_launcher import main

sys.exit(main())
