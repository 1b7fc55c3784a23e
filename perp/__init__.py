"""perp: prune LLMs, then recover their quality by retraining a tiny, expressive subset of parameters."""

import os as _os
from importlib.metadata import PackageNotFoundError, version

# Before numpy or torch load OpenBLAS: its idle workers must not spin against torch's threads (perp/runtime.py).
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

try:
    __version__ = version("perp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
