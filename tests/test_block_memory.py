"""Layer-wise recovery's memory: the block MSE and the move from one block to the next work one micro-batch at a
time, so what they add to the device never grows with the calibration set (at 70B scale one layer's hidden states
are 4 GiB; a concatenated copy, an fp32 copy or a full-size elementwise loss of them is an out-of-memory error).

Allocations are counted on the CPU with a dispatch mode that sees every tensor an ATen op creates and follows its
storage until it is freed: `largest` is the largest single allocation, `peak` the most bytes alive at once (of the
storages created while recording, plus those it was told to `track`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from perp.models.families import adapter_for
from perp.models.tiny import build_tiny_model
from perp.prune.engine import LayerInputs, capture_layer_inputs
from perp.recover.layerwise import BlockData, block_mse, outputs

SEQLEN = 32
BATCH = 2  # windows per micro-batch
MANY = 64  # windows of the "large" calibration set: 32 micro-batches


pytestmark = pytest.mark.usefixtures("single_thread")


class Allocations(TorchDispatchMode):
    """Records the storages that ATen ops allocate (not views, not in-place results) and the peak of live bytes."""

    def __init__(self, track: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.live: list[tuple[StorageWeakRef, int, int]] = []  # (weak ref, data_ptr, bytes)
        self.largest = 0
        for tensor in track:
            self._add(tensor.untyped_storage())
        self.start = self.peak = self.alive()

    def alive(self) -> int:
        self.live = [entry for entry in self.live if not entry[0].expired()]
        return sum(entry[2] for entry in self.live)

    def _add(self, storage) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size and all(entry[1] != ptr for entry in self.live):
            self.live.append((StorageWeakRef(storage), ptr, size))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        self.alive()  # drop the freed ones first: a new storage may reuse a freed one's address
        for tensor in tree_flatten(result)[0]:
            if torch.is_tensor(tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
                self._add(tensor.untyped_storage())
        self.peak = max(self.peak, self.alive())
        return result


def _parts(hidden) -> list[torch.Tensor]:
    """The micro-batches of `BlockData.hidden` or of `outputs(...)` (one tensor in the concatenating code)."""
    return [hidden] if torch.is_tensor(hidden) else list(hidden.parts)


def _tensor(hidden) -> torch.Tensor:
    return torch.cat(_parts(hidden))


def _block(dtype: torch.dtype, windows: int, seed: int = 0):
    """(pruned-ish block 0, dense block 0, BlockData of `windows` windows captured one at a time)."""
    model = build_tiny_model("llama", seed).to(dtype)
    dense = build_tiny_model("llama", seed + 1).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (windows, SEQLEN), generator=torch.Generator().manual_seed(7))
    captured = capture_layer_inputs(model, adapter_for(model), ids, "cpu", batch_size=1, dtype=dtype)
    return adapter_for(model).layers(model)[0], adapter_for(dense).layers(dense)[0], BlockData(captured)


def _autocast(dtype: torch.dtype):
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_mse_memory_does_not_grow_with_the_calibration_set(dtype):
    """The old code concatenated the outputs, copied outputs and targets to fp32 and let `mse_loss` build a
    full-size elementwise loss: ~7x the set's bf16 size at once, its largest tensor the whole set in fp32."""
    measured = {}
    for windows in (BATCH, MANY):
        layer, dense, data = _block(dtype, windows)
        targets = outputs(dense, data, BATCH, _autocast(dtype))
        with torch.no_grad(), Allocations() as allocations:
            block_mse(layer, data, targets, BATCH, _autocast(dtype))
        measured[windows] = allocations
    one, many = measured[BATCH], measured[MANY]
    hidden = layer.self_attn.q_proj.in_features
    whole_fp32 = MANY * SEQLEN * hidden * 4
    micro_batch_fp32 = BATCH * SEQLEN * hidden * 4
    # One micro-batch is what the block itself needs (its activations); 32 of them need no more at any moment.
    assert many.largest <= max(one.largest, micro_batch_fp32), (many.largest, one.largest)
    assert many.peak <= one.peak + 1024, (many.peak, one.peak)  # + the fp64 running sums
    assert many.largest < whole_fp32 / 4 and many.peak < whole_fp32 / 2, (many.largest, many.peak, whole_fp32)


@pytest.mark.parametrize("dtype, batch", [(torch.float32, 2), (torch.float32, 3), (torch.bfloat16, 2)])
def test_block_mse_equals_a_direct_fp64_computation(dtype, batch):
    """Per micro-batch sums accumulated in fp64 give the MSE over every element (and the old fp32 mean to within
    rounding), whether or not the micro-batches divide the windows evenly."""
    layer, dense, data = _block(dtype, 11)
    targets = outputs(dense, data, batch, _autocast(dtype))
    mse = block_mse(layer, data, targets, batch, _autocast(dtype))
    out, y = _tensor(outputs(layer, data, batch, _autocast(dtype))), _tensor(targets)
    exact = float(((out.double() - y.double()) ** 2).mean())
    assert mse > 0 and math.isclose(mse, exact, rel_tol=1e-6), (mse, exact)
    assert math.isclose(mse, float(F.mse_loss(out.float(), y.float())), rel_tol=1e-5)


def test_block_mse_on_micro_batches_that_are_not_the_blocks_own():
    """Fused mode: inputs and targets arrive as the engine's micro-batches (here 3 and 4 windows), the MSE runs on
    micro-batches of the training's batch size (2) across them: the same value as on one tensor."""
    layer, dense, data = _block(torch.float32, 11)
    whole = _tensor(data.hidden)
    targets = _tensor(outputs(dense, data, 2, None))
    engine_inputs = list(whole.clone().split(3))
    engine_targets = list(targets.clone().split(4))
    fused = block_mse(layer, BlockData(LayerInputs([whole[:1]], [data.args], [data.kwargs]), hidden=engine_inputs),
                      engine_targets, 2, None)
    assert math.isclose(fused, block_mse(layer, data, targets, 2, None), rel_tol=1e-6)


def test_rows_serve_micro_batches_and_windows_as_one_concatenated_tensor_would():
    from perp.recover.layerwise import Rows

    whole = torch.arange(11 * 2 * 3, dtype=torch.float32).reshape(11, 2, 3)
    rows = Rows([part.clone() for part in whole.split([3, 1, 5, 2])])
    assert len(rows) == 11
    for size in (1, 2, 3, 4, 11, 20):
        assert [t.tolist() for t in rows.split(size)] == [t.tolist() for t in whole.split(size)]
    for pick in ([0], [10, 0, 3, 3, 4], [-1, 5, 9, 2]):
        assert torch.equal(rows.take(pick), whole[pick])
    with pytest.raises(IndexError):
        rows.take([11])
    old = [StorageWeakRef(p.untyped_storage()) for p in rows.parts]
    rows.regroup(4)
    assert [p.shape[0] for p in rows.parts] == [4, 4, 3] and torch.equal(torch.cat(rows.parts), whole)
    # The old parts are released once consumed; rows 0-3 of the 5-window part are used as they are (a view),
    # its last row and the 2-window part are copied into the last micro-batch: never more than one micro-batch held
    # twice.
    assert [ref.expired() for ref in old] == [True, True, False, True]
    held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in rows.parts}
    assert sum(held.values()) <= whole.nbytes + 4 * whole[0].nbytes
    parts = list(rows.parts)
    rows.regroup(4)
    assert all(a is b for a, b in zip(parts, rows.parts))  # already cut so: untouched


def test_moving_to_the_next_block_replaces_the_inputs_one_micro_batch_at_a_time():
    """Capture one window at a time, re-cut into micro-batches, replace them by the block's outputs: the extra
    memory is one micro-batch's, never a second copy of the set (the old code built the outputs as a list, then
    concatenated them, while the inputs were still alive: twice the set)."""
    extra = {}
    for windows in (BATCH, MANY):
        layer, _, data = _block(torch.float32, windows)
        expected = _tensor(outputs(layer, data, BATCH, None))
        with torch.no_grad(), Allocations(track=tuple(data.hidden.parts)) as regrouping:
            data.hidden.regroup(BATCH)
        with torch.no_grad(), Allocations(track=tuple(data.hidden.parts)) as moving:
            data.advance(layer, BATCH, None)
        assert torch.equal(_tensor(data.hidden), expected)
        assert [p.shape[0] for p in data.hidden.parts] == [BATCH] * (windows // BATCH)
        extra[windows] = (regrouping.peak - regrouping.start, moving.peak - moving.start)
    micro_batch_fp32 = BATCH * SEQLEN * layer.self_attn.q_proj.in_features * 4
    assert extra[MANY][0] <= 2 * micro_batch_fp32, extra
    assert extra[MANY][1] <= extra[BATCH][1] + micro_batch_fp32, extra  # the block's own activations


def test_fused_hands_the_engines_micro_batches_to_the_block_without_copies():
    """The old fused hook concatenated the engine's inputs and the dense targets: +1 copy of the set each."""
    from perp.recover.fused import FusedReconstruction

    layer, dense, data = _block(torch.float32, 7)
    inputs = LayerInputs(list(_tensor(data.hidden).split(3)), [data.args] * 3, [data.kwargs] * 3)
    targets = list(_tensor(outputs(dense, data, 3, None)).split(3))
    engine_inputs, engine_targets = list(inputs.hidden), list(targets)
    seen = {}

    class Trainer:
        def train(self, index, layer, data, targets):
            seen["data"], seen["targets"] = data, targets

    hook = FusedReconstruction.__new__(FusedReconstruction)
    hook.call = LayerInputs([data.hidden.parts[0]], [data.args], [data.kwargs])
    hook.trainer = Trainer()
    with Allocations() as allocations:
        hook(0, layer, inputs, targets)
    assert allocations.largest == 0  # nothing allocated at all
    assert all(a is b for a, b in zip(seen["data"].hidden.parts, engine_inputs))
    assert all(a is b for a, b in zip(seen["targets"].parts, engine_targets))
    assert all(a is b for a, b in zip(inputs.hidden, engine_inputs)) and targets == []
