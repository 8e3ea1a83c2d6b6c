"""Quiet by default: the commands hide TensorFlow/absl/CUDA start-up logs and Keras's chatter unless --verbose."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings

# Libraries whose own log lines and warnings are noise to a featstack user (ours are printed, never logged).
NOISY_LOGGERS = ("tensorflow", "absl", "jax", "jax._src.xla_bridge", "h5py")
NOISY_MODULES = r"(keras|tensorflow|tf_keras|jax|jaxlib|absl|google\.protobuf)(\.|$)"


@contextlib.contextmanager
def silenced_stderr():
    """Point file descriptor 2 at /dev/null for the block: C++ code writes there, past Python's sys.stderr.

    Python's own sys.stderr, where it is that descriptor, writes to the real stderr meanwhile: a heartbeat's
    "still loading ..." line (featstack.heartbeat) must reach the user during the tens of seconds of the import."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    python_stderr = sys.stderr
    try:
        os.dup2(devnull, 2)
        if _is_fd2(python_stderr):
            sys.stderr = os.fdopen(saved, "w", closefd=False, buffering=1, encoding=python_stderr.encoding,
                                   errors="backslashreplace")
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _is_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test's capture, a StringIO
        return False


class _QuietImports(importlib.abc.MetaPathFinder):
    """Imports ``tensorflow`` with stderr silenced and turns Keras's stdout chatter off once ``keras`` is loaded.

    TensorFlow's libraries log through absl before ``absl::InitializeLog()`` runs, which no environment variable
    reaches (the oneDNN and "Could not find cuda drivers" lines, twice). An import error still surfaces: the
    exception propagates after stderr is restored.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ("tensorflow", "keras"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            if fullname == "tensorflow":
                with silenced_stderr():
                    exec_module(module)
            else:
                exec_module(module)
                _keras_quiet()

        spec.loader.exec_module = quiet_exec_module  # this loader instance belongs to this spec alone
        return spec


def configure(verbose: bool = False) -> None:
    """Call before Keras is imported. Quiet unless ``verbose``; progress bars, summaries and our messages stay."""
    if verbose:
        return  # every library speaks as it would without featstack
    # C++ logs after absl's initialisation: INFO/WARNING/ERROR (ERROR includes CUDA probing on CPU-only machines).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in NOISY_LOGGERS:  # e.g. tf.function retracing warnings (the "tensorflow" Python logger)
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    if "keras" in sys.modules:
        _keras_quiet()
    elif not any(isinstance(f, _QuietImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImports())


def _keras_quiet() -> None:
    """Keras prints "Downloading data from ..." and its progress bars to stdout unless interactive logging is off;
    off, they go to absl's INFO log, hidden. A failed download still raises, and our error names the file."""
    import keras
    keras.config.disable_interactive_logging()
