"""One model construction at a time in a process.

transformers builds a model under process-wide patches: `from_pretrained` swaps `PreTrainedModel.tie_weights` and
`init_weights` and torch's `nn.init` functions for no-ops and changes torch's default dtype, then puts them back.
Two threads doing so at once (a Prefect flow running stages on its thread pool, as `sweep` does) can each restore
what the other patched in, leaving every later model in the process untied or uninitialised. Every place perp
builds or loads a model holds this lock; loading itself is I/O-bound, so little is lost.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_CONSTRUCTION = threading.RLock()


@contextmanager
def one_model_at_a_time() -> Iterator[None]:
    with _CONSTRUCTION:
        yield
