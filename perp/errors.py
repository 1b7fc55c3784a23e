"""User-facing errors.

Everything raised as a `PerpError` is a problem with the user's input or environment. The CLI prints it as one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class PerpError(Exception):
    """A clear, user-facing problem (bad input, missing file, offline hub access...)."""


class ConfigError(PerpError, ValueError):
    """A configuration value is invalid. The message names the key and what is allowed."""


class ModelSourceError(PerpError):
    """A model cannot be located or loaded from the given source."""


class UnsupportedArchitectureError(PerpError):
    """The model's architecture has no family adapter."""


class DataSourceError(PerpError):
    """A text or token source cannot be read or is unusable for the request."""


class OutputError(PerpError):
    """An output directory that perp must not write: someone else's files, the current directory, an input."""


class PruneNumericsError(PerpError):
    """Pruning cannot proceed on the numbers it got: non-finite calibration activations, a Hessian that cannot be
    inverted even with strong dampening."""
