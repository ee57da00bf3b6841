"""Starting TensorFlow for a `kpq` command without its start-up log lines.

TensorFlow's C++ runtime writes to file descriptor 2 when it is imported and
when it first looks for devices: the oneDNN notice, CPU feature hints, CUDA
probing ("Could not find cuda drivers", "failed call to cuInit: ..." on a
machine without a GPU). Some are written before absl logging is set up, so
`TF_CPP_MIN_LOG_LEVEL` cannot silence them. `import_tensorflow` therefore
runs the import and the device set-up with descriptor 2 pointed at a
temporary file: the lines are dropped when start-up succeeds and replayed on
stderr when it fails, so a broken installation still explains itself.
Everything after start-up (TensorFlow's warnings, kpq's own messages) reaches
stderr as usual.
"""

import os
import sys
import tempfile


def _start():
    import keras  # noqa: F401  (Keras' import selects and loads the backend)
    import tensorflow as tf

    tf.config.list_logical_devices()  # initialises the runtime: CUDA probing logs here


def import_tensorflow(show_logs=False):
    """Imports TensorFlow and Keras and initialises TensorFlow's devices.

    Args:
        show_logs: let the start-up log lines through (`kpq --verbose`).
    """
    if show_logs or "tensorflow" in sys.modules:
        _start()
        return
    # INFO lines that come later (e.g. a GPU's cuDNN version) are start-up noise
    # too; warnings and errors still show. A value the user set is kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            _start()
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
                sys.stderr.flush()
