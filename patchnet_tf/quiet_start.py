"""Imports TensorFlow without the native start-up lines a healthy CPU start prints.

TensorFlow's C++ runtime writes them to file descriptor 2 while it loads, before
absl logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot silence them; among them
"failed call to cuInit" on machines without a GPU, which reads like a failure. The
import (and the device scan that prints the CUDA lines) runs with fd 2 captured;
every captured line that is not known start-up noise is written out afterwards, so
real errors still show.
"""

import os
import re
import sys
import tempfile

START_UP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog"
    r"|oneDNN custom operations are on"
    r"|cudart_stub\.cc|Could not find cuda drivers"
    r"|cpu_feature_guard\.cc|^To enable the following instructions"
    r"|failed call to cuInit|cuda_executor\.cc|cuda_diagnostics\.cc"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc|TF-TRT Warning"
)


def import_tensorflow():
    if "tensorflow" in sys.modules:
        return
    # Native INFO and WARNING lines (e.g. "Local rendezvous is aborting" after a bad image, which the
    # commands report themselves) are off unless asked for; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    try:
        saved_stderr = os.dup(2)
    except OSError:  # no fd 2 (a detached process): nothing to keep clean
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA probing prints here, not at import
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            kept = [line for line in lines if not START_UP_NOISE.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
