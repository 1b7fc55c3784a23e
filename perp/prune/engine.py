"""The sequential calibration engine: one decoder layer on the compute device at a time.

1. `capture_layer_inputs` runs the calibration windows through the model until the first decoder layer is
   called (a forward pre-hook with kwargs records its inputs and stops the forward), so only the stem
   (embeddings, rotary tables) runs, on the compute device.
2. For each decoder layer in order (`prune_model`, `sequential="layer"`, the reference algorithms):
   - bring it to the compute device;
   - pass 1: run the calibration inputs through it, collecting per-group statistics with one forward pre-hook
     per input group (Linears reading the same input share one set); once the last group has been seen the
     forward is cut short, so the rest of the layer is not computed for nothing;
   - compute masks and updated weights (the method), measure the reconstruction error, write them back;
   - pass 2: run the now-pruned layer to produce the next layer's inputs, in place;
   - move the layer back to CPU.
   Peak device memory is one layer, the calibration hidden states and one micro-batch of activations.
3. `sequential="linear"` (true-sequential) instead prunes each input group inside a single forward of the whole
   calibration set, in the group's pre-hook, so one pass per layer does statistics, pruning and propagation.

`capture_layer_inputs`, `run_layer` and `propagate` are the reusable pieces for layer-wise recovery: capture the
inputs of layer 0 once, then for each layer run dense and pruned copies on the same `LayerInputs`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn

from perp.errors import PruneNumericsError
from perp.runtime import reuse_freed_memory
from perp.models.families import FamilyAdapter
from perp.models.placement import Visit, visiting
from perp.prune.masks import PackedMask, pack_mask
from perp.prune.methods.base import PruneMethod, PrunedLinear
from perp.prune.owl import outlier_ratios, owl_sparsities
from perp.prune.selection import LayerPlan, decoder_layers
from perp.prune.stats import GroupStats, blas_threads, native_bf16, relative_error, sample_positions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ProgressFn = Callable[[int, int, str], None]  # (layers done, layers total, message)

#: Tokens per forward micro-batch when the caller does not choose (windows = max(1, tokens // seqlen)).
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


class EmulatedPrecisionWarning(UserWarning):
    """The requested compute precision has no hardware support on this device (it still runs, slowly)."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early; never escapes this module."""


# --------------------------------------------------------------------------------------------- layer inputs


@dataclass
class LayerInputs:
    """The inputs of a decoder layer for every calibration micro-batch.

    `hidden[i]` is the hidden-state tensor [b, seqlen, hidden] of micro-batch i; `args[i]` any further positional
    arguments; `kwargs[i]` the keyword arguments the model passed (attention_mask, position_embeddings,
    position_ids, cache_position, ...). Kwargs equal across micro-batches share one tensor.
    """

    hidden: list[torch.Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def windows(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @property
    def device(self) -> torch.device:
        return self.hidden[0].device

    def batches(self) -> Iterator[tuple[int, torch.Tensor, tuple, dict[str, Any]]]:
        """(first token position, hidden, args, kwargs) per micro-batch."""
        offset = 0
        for hidden, args, kwargs in zip(self.hidden, self.args, self.kwargs):
            yield offset, hidden, args, kwargs
            offset += hidden.shape[0] * hidden.shape[1]

    def clone(self) -> "LayerInputs":
        """A copy whose hidden states can be overwritten independently (kwargs are shared, read-only)."""
        return LayerInputs([h.clone() for h in self.hidden], list(self.args), list(self.kwargs))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(item, fn) for item in obj)
    if isinstance(obj, list):
        return [_map_tensors(item, fn) for item in obj]
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    return obj


def _share_equal(obj: Any, reference: Any) -> Any:
    """`obj` with every tensor equal to the one at the same place in `reference` replaced by that tensor."""
    if isinstance(obj, torch.Tensor):
        if (isinstance(reference, torch.Tensor) and reference.shape == obj.shape and reference.dtype == obj.dtype
                and torch.equal(reference.to(obj.device), obj)):
            return reference
        return obj
    if isinstance(obj, (tuple, list)) and isinstance(reference, type(obj)) and len(obj) == len(reference):
        return type(obj)(_share_equal(a, b) for a, b in zip(obj, reference))
    if isinstance(obj, dict) and isinstance(reference, dict):
        return {key: _share_equal(value, reference.get(key)) for key, value in obj.items()}
    return obj


@contextlib.contextmanager
def _stem_on(model: nn.Module, family: FamilyAdapter, device: torch.device) -> Iterator[torch.device]:
    """Temporarily move what runs before the first decoder layer (embeddings, rotary tables...) to `device`.

    Every parameter and buffer outside the decoder layers, the final norm and the LM head moves (tensors are
    moved in place, so tied weights stay tied) and points back at its host storage afterwards: the stem is only
    read, so nothing is copied back. Yields the device the stem runs on.
    """
    skip = tuple(module for path in (family.layers_path, family.final_norm_path, family.lm_head_path)
                 if (module := _submodule(model, path)) is not None)
    with visiting(model, device, write_back=False, skip=skip):
        yield device


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def default_batch_size(seqlen: int, device: torch.device) -> int:
    tokens = DEFAULT_BATCH_TOKENS.get(torch.device(device).type, 4096)
    return max(1, tokens // max(1, seqlen))


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, family: FamilyAdapter, ids: torch.Tensor,
                         device: Optional[torch.device | str] = None, batch_size: Optional[int] = None,
                         dtype: Optional[torch.dtype] = None) -> LayerInputs:
    """Inputs of the first decoder layer for calibration token ids [windows, seqlen].

    The stem (embeddings, rotary tables; not the decoder layers or the LM head) visits `device` (default: where
    the embeddings are) and the forward stops when the first decoder layer is called, so only the stem runs.
    The captured tensors stay on `device`; hidden states are cast to `dtype` if given. `batch_size` windows per
    micro-batch (default: about 4096 tokens on CPU, 16384 on CUDA).
    """
    layers = decoder_layers(model, family)
    device = torch.device(device) if device is not None else family.embeddings(model)[0].weight.device
    batch_size = batch_size or default_batch_size(ids.shape[1], device)
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    inputs = LayerInputs(hidden=[])
    try:
        with _stem_on(model, family, device) as exec_device:
            _capture_batches(model, ids, batch_size, exec_device, device, dtype, captured, inputs)
    finally:
        handle.remove()
        model.train(was_training)
    return inputs


def _capture_batches(model: nn.Module, ids: torch.Tensor, batch_size: int, exec_device: torch.device,
                     device: torch.device, dtype: Optional[torch.dtype], captured: list, inputs: LayerInputs) -> None:
    for batch in ids.split(batch_size):
        captured.clear()
        try:
            model(input_ids=batch.to(exec_device), use_cache=False)
        except _StopForward:
            pass
        if not captured:
            raise RuntimeError("the model's forward never called its first decoder layer")
        args, kwargs = captured[0]
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        hidden = hidden.to(device=device, dtype=dtype or hidden.dtype)
        if inputs.kwargs:  # reuse batch 0's tensors where equal (masks, rotary tables...)
            rest = _share_equal(rest, inputs.args[0])
            kwargs = _share_equal(kwargs, inputs.kwargs[0])
        move = lambda t: t.to(device) if t.device != device else t  # noqa: E731
        inputs.hidden.append(hidden)
        inputs.args.append(_map_tensors(rest, move))
        inputs.kwargs.append(_map_tensors(kwargs, move))


def run_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any], args: tuple = ()) -> torch.Tensor:
    """One decoder layer on one micro-batch; returns the output hidden states (whatever the layer returns)."""
    out = layer(hidden, *args, **layer_kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def propagate(layer: nn.Module, inputs: LayerInputs, in_place: bool = True,
              autocast_dtype: Optional[torch.dtype] = None) -> LayerInputs:
    """Run every micro-batch through `layer`. In place, `inputs` then holds the layer's outputs."""
    target = inputs if in_place else LayerInputs([], list(inputs.args), list(inputs.kwargs))
    with _autocast(inputs.device, autocast_dtype):
        for index, (_, hidden, args, kwargs) in enumerate(inputs.batches()):
            out = run_layer(layer, hidden, kwargs, args).to(hidden.dtype)
            if in_place:
                inputs.hidden[index] = out
            else:
                target.hidden.append(out)
    return target


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------- engine


@dataclass
class EngineOptions:
    """How the engine runs.

    `sequential`: `layer` (default, the reference algorithms) collects every Linear's statistics from the dense
    layer, prunes, then runs the pruned layer again for the next layer's inputs: two passes per layer, any
    number of micro-batches. `linear` ("true sequential") prunes each input group as soon as the forward reaches
    it, so later Linears of the layer calibrate on the outputs of already-pruned ones, and the same forward
    produces the next layer's inputs: one pass per layer, but the whole calibration set goes through the layer
    at once (activation memory ∝ windows × seqlen).

    `auto` takes `linear` when one layer's activations over the whole calibration set are estimated to fit in
    `ONE_PASS_BUDGET_BYTES` (2 GiB: SmolLM2 on 32 × 512 tokens needs ~0.6 GiB, a 7B layer on 128 × 2048 ~34 GiB),
    else `layer`; `EngineResult.sequential` says which ran.

    `compute_dtype`: precision of the calibration forwards (None: the weights' dtype). A lower one than the
    weights (bf16 for an fp32 model) runs under autocast: matmuls in bf16; residual stream, statistics and all
    pruning math stay fp32. `error_tokens`: how many calibration tokens (a seeded random subset) estimate the
    reconstruction error of methods without a Hessian; SparseGPT's is exact, from its Hessian.
    """

    device: torch.device | str = "cpu"
    compute_dtype: Optional[torch.dtype] = None
    batch_size: Optional[int] = None  # windows per micro-batch (sequential="layer")
    error_tokens: int = 512
    offload: bool = True  # move each layer back to CPU once pruned (when the device is not the CPU)
    sequential: str = "layer"  # "layer", "linear" or "auto"
    seed: int = 0
    owl_lambda: float = 0.0  # OWL per-layer sparsity (perp.prune.owl); 0: every layer at the spec's sparsity
    owl_m: float = 5.0
    reconstruct: Optional["LayerReconstruction"] = None  # fused layer-wise recovery: see `LayerReconstruction`


class LayerReconstruction(Protocol):
    """Called by the engine for each pruned layer, on the device, between pruning and propagation.

    `inputs` are the layer's calibration inputs (the outputs of the already pruned, already reconstructed layers
    before it), `targets` the dense layer's outputs on those inputs, computed before it was pruned. The callee
    retrains the pruned layer in place (masks held); the engine then runs the reconstructed layer to produce the
    next layer's inputs. Needs the two-pass `layer` mode: the inputs must outlive the pruning.
    """

    def __call__(self, index: int, layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor]) -> None: ...


SEQUENTIAL_MODES = ("layer", "linear", "auto")
ONE_PASS_BUDGET_BYTES = 2 * 1024**3  # sequential="auto": the largest one-layer activation estimate run in one pass


@dataclass
class EngineResult:
    linears: dict[str, dict[str, Any]]  # full name → {shape, pruned, sparsity, rel_error, error}
    masks: dict[str, PackedMask]  # full name → kept-mask (True = kept), bit-packed on CPU
    timings: dict[str, float]
    notes: list[str]
    peak_device_bytes: Optional[int]
    tokens: int
    sequential: str = "layer"  # the mode that ran ("auto" resolved)
    layer_sparsity: dict[int, float] = field(default_factory=dict)  # OWL: layer index → its sparsity
    outlier_ratios: dict[int, float] = field(default_factory=dict)  # OWL: layer index → outlier share


class _Timer:
    """Wall time per phase; a phase nested in another is not counted twice (the outer one excludes it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open phase: [time spent in nested phases]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        self._stack.append([0.0])
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            nested = self._stack.pop()[0]
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1][0] += elapsed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"holders": 0, "saved": 0}


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Solve and error phases are many small ops (the OBS column loop, selections, masked writes, small GEMMs).
    On CPU, intra-op threads barely help them and, when the cores are shared, their barriers cost more than the
    work (measured: SparseGPT's solve 11 s on one thread, 390 s on two on a loaded 2-core machine). Run them on
    one thread; the calibration forwards keep every thread.

    torch's thread count is process-wide, and concurrent tasks (a sweep on a thread-pool runner) may prune at
    the same time: the first to enter saves the count, the last to leave restores it."""
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_STATE["holders"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["holders"] += 1
    try:
        with blas_threads(1):  # scipy's LAPACK/BLAS calls in the solve (strtri, strmm) too
            yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["holders"] -= 1
            if _THREADS_STATE["holders"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


class _Pruner:
    """Prunes the groups of one layer and records masks, sparsity and errors."""

    def __init__(self, method: PruneMethod, timer: _Timer, device: torch.device) -> None:
        self.method, self.timer, self.device = method, timer, device
        self.linears_out: dict[str, dict[str, Any]] = {}
        self.masks: dict[str, PackedMask] = {}

    @torch.no_grad()
    def prune_group(self, plan: LayerPlan, group: list[str], linears: dict[str, nn.Linear],
                    stats: Optional[GroupStats]) -> None:
        with _single_thread_on_cpu(self.device):
            self._prune_group(plan, group, linears, stats or GroupStats(linears[group[0]].in_features, self.device))

    def _prune_group(self, plan: LayerPlan, group: list[str], linears: dict[str, nn.Linear],
                     stats: GroupStats) -> None:
        label = plan.full_name(group[0]) if len(group) == 1 else f"{plan.prefix}.{{{','.join(group)}}}"
        if not stats.finite():
            raise PruneNumericsError(
                f"{label}: its calibration inputs are not finite (inf or NaN): the calibration forward overflowed "
                "(float16 stops at 65504) or the weights hold inf/NaN; calibrate in bfloat16 or float32 "
                "(model.dtype, or prune.compute_dtype with float32 weights)"
            )
        with self.timer.phase("solve"):
            work = {name: linears[name].weight.detach().to(torch.float32, copy=True) for name in group}
            pruned = self.method.prune_group(work, stats, label)
        for name in group:
            weight, mask, delta_energy, dense_energy = PrunedLinear(*pruned[name])  # (w, mask) tuples too
            linear, full = linears[name], plan.full_name(name)
            with self.timer.phase("error"):
                error, how = relative_error(linear.weight.detach().float(), weight, stats, delta_energy, dense_energy)
            with self.timer.phase("solve"):
                linear.weight.copy_(weight.to(linear.weight.dtype))
                count = int(mask.sum())
                self.masks[full] = pack_mask(~mask)
            self.linears_out[full] = {"shape": list(mask.shape), "pruned": count,
                                      "sparsity": count / mask.numel(), "rel_error": error, "error": how}
        stats.free()


@dataclass
class _HookState:
    offset: int = 0
    calls: int = 0
    expected: Optional[int] = None


def _collect_stats(layer: nn.Module, linears: dict[str, nn.Linear], plan: LayerPlan, inputs: LayerInputs,
                   method: PruneMethod, sample_index: Optional[torch.Tensor], device: torch.device,
                   autocast_dtype: Optional[torch.dtype]) -> dict[int, GroupStats]:
    """Pass 1: per-group statistics of the dense layer's inputs, cut short after the last group's input."""
    stats: dict[int, GroupStats] = {}
    for index, group in enumerate(plan.groups):
        stats[index] = GroupStats(linears[group[0]].in_features, device, colsq=method.needs_colsq,
                                  hessian=method.needs_hessian, sample_index=sample_index)
    state = _HookState()

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            with torch.autocast(device_type=device.type, enabled=False):
                stats[index].add(args[0], state.offset)
            state.calls += 1
            if state.expected is not None and state.calls >= state.expected:
                raise _StopForward

        return hook

    handles = [linears[group[0]].register_forward_pre_hook(make_hook(index)) for index, group in enumerate(plan.groups)]
    try:
        with _autocast(device, autocast_dtype):
            for batch_index, (offset, hidden, args, kwargs) in enumerate(inputs.batches()):
                state.offset, state.calls = offset, 0
                try:
                    run_layer(layer, hidden, kwargs, args)
                except _StopForward:
                    pass
                if batch_index == 0:
                    state.expected = state.calls  # the hooks fire in the same order for every batch
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _prune_in_forward(layer: nn.Module, linears: dict[str, nn.Linear], plan: LayerPlan, inputs: LayerInputs,
                      pruner: _Pruner, sample_index: Optional[torch.Tensor], device: torch.device,
                      autocast_dtype: Optional[torch.dtype]) -> None:
    """sequential="linear": one forward of the whole calibration set; each group is pruned in its pre-hook, from
    the input it receives, before its Linears run. The layer's (pruned) output replaces `inputs`."""
    method = pruner.method
    done: set[int] = set()

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if index in done:
                return
            done.add(index)
            group = plan.groups[index]
            with torch.autocast(device_type=device.type, enabled=False):  # pruning math stays fp32
                with pruner.timer.phase("stats"):
                    stats = GroupStats(linears[group[0]].in_features, device, colsq=method.needs_colsq,
                                       hessian=method.needs_hessian, sample_index=sample_index)
                    stats.add(args[0], 0)
                pruner.prune_group(plan, group, linears, stats)

        return hook

    handles = [linears[group[0]].register_forward_pre_hook(make_hook(index)) for index, group in enumerate(plan.groups)]
    try:
        with pruner.timer.phase("forward"):
            propagate(layer, inputs, in_place=True, autocast_dtype=autocast_dtype)
    finally:
        for handle in handles:
            handle.remove()
    missing = [group for index, group in enumerate(plan.groups) if index not in done]
    if missing:
        raise RuntimeError(f"{plan.prefix}: the layer's forward never called {missing}")


@torch.no_grad()
def prune_model(model: PreTrainedModel, family: FamilyAdapter, method: PruneMethod, plans: Sequence[LayerPlan],
                ids: torch.Tensor, options: Optional[EngineOptions] = None,
                progress: Optional[ProgressFn] = None) -> EngineResult:
    """Prune the planned Linears of `model` in place, layer by layer, calibrated on token ids [windows, seqlen].

    The model's weights may live on CPU; each layer visits `options.device` in turn. Validation (`plan_pruning`,
    `check_calibration`) must have happened before: this function assumes a valid plan.
    """
    options = options or EngineOptions()
    if options.sequential not in SEQUENTIAL_MODES:
        raise ValueError(f"sequential must be one of {SEQUENTIAL_MODES}, got {options.sequential!r}")
    if options.owl_lambda < 0 or options.owl_m <= 0:
        raise ValueError(f"owl_lambda must be >= 0 and owl_m > 0, got {options.owl_lambda}, {options.owl_m}")
    if options.owl_lambda > 0:
        low, high = method.spec.sparsity - 2 * options.owl_lambda, method.spec.sparsity + 2 * options.owl_lambda
        if method.spec.nm is not None or not (low > 0 and high < 1):
            raise ValueError(f"OWL needs an unstructured pattern and sparsity ± 2·owl_lambda inside (0, 1); got "
                             f"{method.spec.pattern} and [{low:.3g}, {high:.3g}]")
    if options.reconstruct is not None and options.sequential == "linear":
        raise ValueError("fused layer-wise reconstruction needs sequential='layer' (or 'auto'): it trains each "
                         "pruned layer on the inputs that 'linear' mode overwrites while pruning")
    device = torch.device(options.device)
    if device.type == "cpu" and options.compute_dtype == torch.bfloat16 and not native_bf16(device):
        message = ("prune.compute_dtype bfloat16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated "
                   "here and much slower than float32; use compute_dtype auto or float32")
        warnings.warn(message, EmulatedPrecisionWarning, stacklevel=2)
        method.notes.append(message)
    with reuse_freed_memory(device.type == "cpu"):
        return _prune_model(model, family, method, plans, ids, options, progress)


def resolve_sequential(mode: str, model: PreTrainedModel, ids: torch.Tensor, compute_dtype: Optional[torch.dtype] = None
                       ) -> str:
    """`layer` or `linear` for `mode`; `auto` picks `linear` when the one-pass activation estimate of a decoder
    layer over all of `ids` fits in `ONE_PASS_BUDGET_BYTES`."""
    if mode != "auto":
        return mode
    return "linear" if one_pass_activation_bytes(model, ids, compute_dtype) <= ONE_PASS_BUDGET_BYTES else "layer"


def one_pass_activation_bytes(model: PreTrainedModel, ids: torch.Tensor,
                              compute_dtype: Optional[torch.dtype] = None) -> int:
    """Rough peak of one decoder layer's forward over every calibration token at once: the residual stream,
    norms, q/k/v/o and the three MLP intermediates per token (and eager attention's probabilities)."""
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden)
    heads = getattr(config, "num_attention_heads", 1)
    windows, seqlen = ids.shape
    element = max(torch.finfo(compute_dtype).bits // 8 if compute_dtype is not None else 0,
                  next(model.parameters()).element_size())
    per_token = (8 * hidden + 3 * intermediate) * element
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        per_token += heads * seqlen * element
    return windows * seqlen * per_token


def _prune_model(model: PreTrainedModel, family: FamilyAdapter, method: PruneMethod, plans: Sequence[LayerPlan],
                 ids: torch.Tensor, options: EngineOptions, progress: Optional[ProgressFn]) -> EngineResult:
    device = torch.device(options.device)
    timer = _Timer(device)
    pruner = _Pruner(method, timer, device)
    last = max((plan.index for plan in plans if plan.groups), default=-1)
    total = last + 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sequential = "layer" if options.reconstruct is not None else resolve_sequential(
        options.sequential, model, ids, options.compute_dtype)
    single_pass = sequential == "linear"

    def autocast_for(layer: nn.Module) -> Optional[torch.dtype]:
        weight_dtype = next(layer.parameters()).dtype
        return options.compute_dtype if options.compute_dtype not in (None, weight_dtype) else None

    ratios: dict[int, float] = {}
    layer_sparsity: dict[int, float] = {}
    if options.owl_lambda > 0:
        with timer.phase("owl"):
            dense_inputs = capture_layer_inputs(model, family, ids, device, options.batch_size)
            ratios = outlier_ratios(model, family, plans[:total], dense_inputs, options.owl_m, device, autocast_for,
                                    options.offload)
            del dense_inputs
            layer_sparsity = owl_sparsities(ratios, method.spec.sparsity, options.owl_lambda)
        if progress:
            progress(0, total, "OWL layer sparsities set")

    with timer.phase("capture"):
        batch_size = ids.shape[0] if single_pass else options.batch_size
        inputs = capture_layer_inputs(model, family, ids, device, batch_size)
    tokens = inputs.tokens
    needs_pass1 = method.needs_calibration or options.error_tokens > 0
    sample_index = None
    if not method.needs_hessian and options.error_tokens > 0:
        sample_index = sample_positions(tokens, options.error_tokens, options.seed)
    if progress:
        progress(0, total, "calibration inputs captured")

    base_spec = method.spec
    try:
        _prune_layers(model, family, method, plans, total, inputs, options, pruner, timer, sample_index,
                      needs_pass1, single_pass, layer_sparsity, autocast_for, progress)
    finally:
        method.spec = base_spec
    del inputs
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return EngineResult(linears=pruner.linears_out, masks=pruner.masks, timings=timer.totals,
                        notes=list(method.notes), peak_device_bytes=peak, tokens=tokens, sequential=sequential,
                        layer_sparsity=layer_sparsity, outlier_ratios=ratios)



def _prune_layers(model: nn.Module, family: FamilyAdapter, method: PruneMethod, plans: Sequence[LayerPlan], total: int,
                  inputs: LayerInputs, options: EngineOptions, pruner: _Pruner, timer: _Timer,
                  sample_index: Optional[torch.Tensor], needs_pass1: bool, single_pass: bool,
                  layer_sparsity: dict[int, float], autocast_for: Callable[[nn.Module], Optional[torch.dtype]],
                  progress: Optional[ProgressFn]) -> None:
    device = torch.device(options.device)
    layers = decoder_layers(model, family)
    last = total - 1
    base_spec = method.spec
    for plan in plans[:total]:
        layer = layers[plan.index]
        with timer.phase("onload"):
            visit = Visit(layer, device)
        autocast_dtype = autocast_for(layer)
        method.spec = replace(base_spec, sparsity=layer_sparsity.get(plan.index, base_spec.sparsity))
        linears = family.linears(layer)
        if single_pass and plan.groups:
            _prune_in_forward(layer, linears, plan, inputs, pruner, sample_index, device, autocast_dtype)
        else:
            if plan.groups:
                targets = None
                if options.reconstruct is not None:
                    with timer.phase("targets"):  # the dense layer's outputs, before it is pruned
                        targets = propagate(layer, inputs, in_place=False, autocast_dtype=autocast_dtype).hidden
                stats: dict[int, GroupStats] = {}
                if needs_pass1:
                    with timer.phase("stats"):
                        stats = _collect_stats(layer, linears, plan, inputs, method, sample_index, device,
                                               autocast_dtype)
                for index, group in enumerate(plan.groups):
                    pruner.prune_group(plan, group, linears, stats.pop(index, None))
                if targets is not None and options.reconstruct is not None:
                    with timer.phase("reconstruct"), torch.enable_grad():
                        options.reconstruct(plan.index, layer, inputs, targets)
                    del targets
            with timer.phase("propagate"):
                if plan.index < last:  # the last pruned layer's outputs feed nothing that is pruned
                    propagate(layer, inputs, in_place=True, autocast_dtype=autocast_dtype)
        with timer.phase("offload"):
            if options.offload:
                visit.end()  # the pruned weights go back into the host memory they came from
        if progress:
            done = [pruner.linears_out[plan.full_name(n)]["rel_error"] for n in plan.names]
            message = f"layer {plan.index}" + (f": mean rel_error {sum(done) / len(done):.4f}" if done else ": skipped")
            progress(plan.index + 1, total, message)

