"""Training windows for recovery: seeded windows from the calibration source (or `recover.data`), served in
seeded shuffled epochs. When a run needs more windows than the source supplies, it warns once that the data
repeats."""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

from perp.config import PerpConfig, TextSourceConfig
from perp.data import TokenSet, calibration_set
from perp.recover.base import DataRepeatWarning


def training_source(config: PerpConfig) -> TextSourceConfig:
    """`recover.data` (default: the calibration source), cut into windows of `recover.seqlen` tokens.

    The source's `nsamples` is how many distinct windows the data supplies; `recover.seqlen` is their length.
    """
    source = config.recover.data or config.data.calibration
    return source.model_copy(update={"seqlen": config.recover.seqlen})


def training_windows(config: PerpConfig, tokenizer: Any) -> TokenSet:
    return calibration_set(training_source(config), tokenizer)


class WindowStream:
    """Batches of `batch_size` windows, each epoch a fresh seeded permutation of all windows."""

    def __init__(self, windows: TokenSet, batch_size: int, seed: int) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed

    def plan(self, batches: int) -> dict[str, Any]:
        needed = batches * self.batch_size
        supplied = self.windows.num_windows
        return {"windows_needed": needed, "windows_supplied": supplied, "data_repeats": needed > supplied,
                "epochs": needed / supplied}

    def warn_if_repeating(self, count: int) -> None:
        """Warn (once per call) when `count` batches need more windows than the data supplies."""
        plan = self.plan(count)
        if plan["data_repeats"]:
            warnings.warn(DataRepeatWarning(
                f"recovery needs {plan['windows_needed']} windows ({count} batches of {self.batch_size}) but the "
                f"data supplies {plan['windows_supplied']} (nsamples); windows repeat over "
                f"{plan['epochs']:.2f} epochs. Raise the source's nsamples for fresh data."
            ), stacklevel=3)

    def batches(self, count: int, warn: bool = True) -> Iterator[torch.Tensor]:
        """`count` batches of token ids [batch_size, seqlen]."""
        if warn:
            self.warn_if_repeating(count)
        return (self.windows.ids[picked] for picked in self.index_batches(count))

    def index_batches(self, count: int) -> Iterator[list[int]]:
        """`count` batches of window indices, in the seeded order (the same for every call)."""
        order: list[int] = []
        epoch = 0
        n = self.windows.num_windows
        for _ in range(count):
            while len(order) < self.batch_size:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order.extend(torch.randperm(n, generator=generator).tolist())
                epoch += 1
            picked, order = order[:self.batch_size], order[self.batch_size:]
            yield picked
