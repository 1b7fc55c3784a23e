"""perp: prune LLMs, then recover their quality by retraining a tiny, expressive subset of parameters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("perp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
