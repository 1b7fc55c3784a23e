"""Pruning methods, one module each, behind a registry keyed by the `prune.method` name.

A method turns the dense weights of one input group (Linears sharing an input) and that input's calibration
statistics into pruned weights and masks. The engine (`perp.prune.engine`) owns everything else: data flow,
devices, statistics collection, error measurement.
"""

from perp.prune.methods.base import METHODS, PruneMethod, create_method
from perp.prune.methods import magnitude, sparsegpt, wanda  # noqa: F401  (registers)

__all__ = ["METHODS", "PruneMethod", "create_method"]
