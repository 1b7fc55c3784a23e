"""PERP recovery: retrain a tiny, expressive subset of a pruned model's parameters.

Methods (combine with '+', e.g. `norm+bias+masklora`): `bias`, `norm`, `lm_head` (LoRA on the LM head),
`lora` (plain LoRA, dense result: baseline only), `masklora` (W + s·(BA ⊙ M)), `scalelora` (W ⊙ BA) and
`full` (every weight, masks held). Modes: `end2end` (next-token loss over seeded windows) and `layerwise`
(each pruned block trained to match the dense block's outputs, one block on the device at a time).
"""

from perp.recover import bias, full, lm_head, lora, masklora, norm, scalelora  # noqa: F401  (registers)
from perp.recover.base import (METHODS, DataRepeatWarning, RecoverError, RecoverMethod, Scope, Settings, block_scope,
                               model_scope)
from perp.recover.masklora import MaskLoRALinear
from perp.recover.masks import capture_masks, mask_violations
from perp.recover.checks import validate_request
from perp.recover.run import ADAPTER_FILE, REPORT_FILE, run_recover
from perp.recover.scalelora import ScaleLoRALinear
from perp.recover.selection import Attachment, attach

__all__ = [
    "ADAPTER_FILE", "Attachment", "DataRepeatWarning", "METHODS", "MaskLoRALinear", "REPORT_FILE", "RecoverError",
    "RecoverMethod", "ScaleLoRALinear", "Scope", "Settings", "attach", "block_scope", "capture_masks",
    "mask_violations", "model_scope", "run_recover", "validate_request",
]
