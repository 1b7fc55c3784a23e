"""Pruning engine: exact sparsity patterns, agreement with direct implementations of Wanda and SparseGPT, and the
reusable layer-input capture. Everything runs on tiny random LLaMA- and OPT-shaped models in memory."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from perp.config import PRUNE_METHODS
from perp.models.families import LLAMA, OPT
from perp.models.tiny import build_tiny_model
from perp.prune import (METHODS, EngineOptions, PruneSpec, capture_layer_inputs, create_method, load_masks,
                        plan_pruning, propagate, prune_model, run_layer, select_mask)
from perp.prune.masks import pack_mask, save_masks, unpack_bits
from perp.prune.patterns import pruned_per
from perp.prune.methods.sparsegpt import delta_energy, sparsegpt_prune, undamped

FAMILIES = {"llama": LLAMA, "opt": OPT}


pytestmark = pytest.mark.usefixtures("single_thread")


def floor_count(count: int, sparsity: float) -> int:
    return int(math.floor(sparsity * count + 1e-9))


def calib_ids(windows: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (windows, seqlen), generator=torch.Generator().manual_seed(seed))


def prune_tiny(family_name: str, method: str, spec: PruneSpec, ids: torch.Tensor | None = None, seed: int = 0,
               include=("*",), exclude=(), **engine):
    model = build_tiny_model(family_name, seed)
    family = FAMILIES[family_name]
    plans = plan_pruning(model, family, list(include), list(exclude), spec)
    result = prune_model(model, family, create_method(method, spec), plans,
                         calib_ids() if ids is None else ids, EngineOptions(**engine))
    return model, family, result


def test_registry_names_are_the_config_methods():
    assert METHODS.names() == sorted(PRUNE_METHODS)


# --------------------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("spec, check", [
    (PruneSpec(0.3, granularity="row"), "row"),
    (PruneSpec(0.37, granularity="matrix"), "matrix"),
    (PruneSpec(0.0, nm=(2, 4)), (2, 4)),
    (PruneSpec(0.0, nm=(4, 8)), (4, 8)),
    (PruneSpec(0.0, nm=(1, 3)), (1, 3)),
])
def test_select_mask_counts_are_exact_even_with_ties(spec, check):
    score = torch.randint(0, 3, (12, 48)).float()  # many ties
    pruned = select_mask(score, spec)
    if check == "row":
        assert (pruned.sum(1) == floor_count(48, 0.3)).all()
    elif check == "matrix":
        assert int(pruned.sum()) == floor_count(12 * 48, 0.37)
    else:
        n, m = check
        assert (pruned.view(12, 48 // m, m).sum(-1) == m - n).all()
    # nothing kept scores lower than something pruned
    kept_min = torch.where(pruned, torch.inf, score)
    if check == "row":
        assert (score.masked_fill(~pruned, -torch.inf).amax(1) <= kept_min.amin(1)).all()


# --------------------------------------------------------------------------------------------- engine: exact sparsity


def _assert_pattern(model, family, result, spec):
    assert result.linears, "nothing was pruned"
    for name, linear in family.named_decoder_linears(model):
        weight = linear.weight.detach()
        kept = result.masks[name].unpack()
        pruned = ~kept
        assert (weight[pruned] == 0).all() and not torch.signbit(weight[pruned]).any(), f"{name}: not +0.0"
        rows, cols = weight.shape
        if spec.nm:
            n, m = spec.nm
            per_group = pruned.view(rows, cols // m, m).sum(-1)
            assert (per_group == m - n).all(), name
        elif spec.granularity == "row":
            assert (pruned.sum(1) == floor_count(cols, spec.sparsity)).all(), name
        else:
            assert int(pruned.sum()) == floor_count(rows * cols, spec.sparsity), name
        assert result.linears[name]["sparsity"] == pytest.approx(float(pruned.float().mean()))
        assert 0.0 <= result.linears[name]["rel_error"] < 1.5


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 3)])
def test_gpu_nm_selection_equals_the_rank_loop_with_ties(n, m):
    """CUDA takes a sort for N:M groups (fewer kernels); it must pick exactly what the CPU rank loop picks."""
    from perp.prune.patterns import _lowest_in_groups_sorted, _rank_small_groups

    generator = torch.Generator().manual_seed(0)
    grouped = torch.randint(0, 3, (64, 40, m), generator=generator).float()  # many ties
    assert torch.equal(_lowest_in_groups_sorted(grouped, m - n), _rank_small_groups(grouped) < (m - n))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", [
    PruneSpec(0.3, granularity="row", blocksize=32),
    PruneSpec(0.45, granularity="matrix", blocksize=32),
    PruneSpec(0.0, nm=(2, 4), blocksize=32),
    PruneSpec(0.0, nm=(4, 8), blocksize=32),
], ids=["row", "matrix", "2:4", "4:8"])
def test_exact_sparsity_llama(method, spec):
    model, family, result = prune_tiny("llama", method, spec)
    _assert_pattern(model, family, result, spec)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_opt(method):
    for spec in (PruneSpec(0.5, granularity="row", blocksize=32), PruneSpec(0.0, nm=(2, 4), blocksize=32)):
        model, family, result = prune_tiny("opt", method, spec)
        _assert_pattern(model, family, result, spec)


def test_include_exclude_select_by_glob_and_never_touch_head_or_embeddings():
    spec = PruneSpec(0.5)
    dense = build_tiny_model("llama", 0)
    model, family, result = prune_tiny("llama", "wanda", spec, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert sorted(result.linears) == [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj")]
    for name, linear in family.named_decoder_linears(model):
        if name not in result.linears:
            assert torch.equal(linear.weight, dict(dense.named_modules())[name].weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_bf16_compute_and_batching_give_the_same_masks_mostly():
    spec = PruneSpec(0.5)
    _, _, full = prune_tiny("llama", "wanda", spec, batch_size=4)
    _, _, split = prune_tiny("llama", "wanda", spec, batch_size=1)
    for name in full.masks:  # micro-batching changes summation order only
        assert torch.equal(full.masks[name].bits, split.masks[name].bits), name
    _, _, bf16 = prune_tiny("llama", "wanda", spec, compute_dtype=torch.bfloat16)
    agree = [float((full.masks[n].unpack() == bf16.masks[n].unpack()).float().mean()) for n in full.masks]
    assert min(agree) > 0.9


# --------------------------------------------------------------------------------------------- direct references


def _reference_prune(model, family, ids, prune_linear):
    """Layer by layer through the *whole model*: hooks record each Linear's input with earlier layers already
    pruned and this layer dense, then each Linear is pruned on its own (no shared statistics, no capture)."""
    for layer in family.layers(model):
        linears = family.linears(layer)
        inputs = {name: [] for name in linears}
        hooks = [linear.register_forward_hook(
            lambda module, args, out, name=name, inputs=inputs: inputs[name].append(
                args[0].reshape(-1, args[0].shape[-1]).double()))
            for name, linear in linears.items()]
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            X = torch.cat(inputs[name])
            with torch.no_grad():
                linear.weight.copy_(prune_linear(linear.weight.double(), X).float())


def _wanda_direct(sparsity: float, per_row: bool):
    def prune(W, X):
        # Sun et al. 2023: S_ij = |W_ij| · ‖X_j‖₂, the lowest s·(row or matrix) scores removed
        score = W.abs() * X.pow(2).sum(0).sqrt()
        W = W.clone()
        if per_row:
            k = floor_count(W.shape[1], sparsity)
            for r in range(W.shape[0]):
                W[r, torch.sort(score[r], stable=True).indices[:k]] = 0
        else:
            k = floor_count(W.numel(), sparsity)
            W.view(-1)[torch.sort(score.flatten(), stable=True).indices[:k]] = 0
        return W
    return prune


def _sparsegpt_direct(sparsity: float, nm=None, granularity: str = "matrix", blocksize: int = 32, percdamp=0.01):
    def prune(W, X):
        # Frantar & Alistarh 2023, Algorithm 1, one column at a time (no lazy batching), in float64
        W, H = W.clone(), X.t() @ X
        rows, cols = W.shape
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            if nm is None:
                score = W[:, i1:i2] ** 2 / torch.diag(Hinv)[i1:i2] ** 2
                if granularity == "matrix":
                    k = floor_count(rows * i2, sparsity) - floor_count(rows * i1, sparsity)
                    block = torch.zeros(score.numel(), dtype=torch.bool)
                    block[torch.sort(score.flatten(), stable=True).indices[:k]] = True
                    mask[:, i1:i2] = block.view_as(score)
                else:
                    k = floor_count(i2, sparsity) - floor_count(i1, sparsity)
                    order = torch.sort(score, dim=1, stable=True).indices[:, :k]
                    mask[:, i1:i2] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
            for i in range(i1, i2):
                if nm is not None and (i - i1) % nm[1] == 0:
                    n, m = nm
                    score = W[:, i:i + m] ** 2 / torch.diag(Hinv)[i:i + m] ** 2
                    order = torch.sort(score, dim=1, stable=True).indices[:, :m - n]
                    mask[:, i:i + m] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
                w = W[:, i].clone()
                q = w.clone()
                q[mask[:, i]] = 0
                err = (w - q) / Hinv[i, i]
                W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
                W[:, i] = q
        return W
    return prune


def _compare(engine_model, reference_model, family, weight_atol, max_mask_flips=0.0):
    """Same masks and weights. `max_mask_flips` tolerates near-ties decided differently in float32 (engine) and
    float64 (reference); rows whose masks differ are then excluded from the weight comparison."""
    for (name, ours), (_, ref) in zip(family.named_decoder_linears(engine_model),
                                      family.named_decoder_linears(reference_model)):
        ours, ref = ours.weight.detach(), ref.weight.detach()
        flips = (ours == 0) != (ref == 0)
        assert float(flips.float().mean()) <= max_mask_flips, f"{name}: masks differ in {int(flips.sum())}"
        same = ~flips.any(1)
        assert torch.allclose(ours[same], ref[same], atol=weight_atol, rtol=1e-4), \
            f"{name}: max diff {(ours[same] - ref[same]).abs().max()}"


@pytest.mark.parametrize("family_name, per_row", [("llama", True), ("llama", False), ("opt", True)])
def test_wanda_matches_direct_formula(family_name, per_row):
    ids = calib_ids(4, 32)
    spec = PruneSpec(0.5, granularity="row" if per_row else "matrix")
    model, family, _ = prune_tiny(family_name, "wanda", spec, ids, batch_size=2)
    reference = build_tiny_model(family_name, 0)
    _reference_prune(reference, family, ids, _wanda_direct(0.5, per_row))
    _compare(model, reference, family, weight_atol=0)


@pytest.mark.parametrize("family_name, nm, granularity", [
    ("llama", None, "matrix"), ("llama", None, "row"), ("llama", (2, 4), "row"), ("opt", None, "matrix"),
])
def test_sparsegpt_matches_direct_algorithm(family_name, nm, granularity):
    ids = calib_ids(4, 32)
    spec = PruneSpec(0.5, nm=nm, granularity=granularity, blocksize=32)
    model, family, _ = prune_tiny(family_name, "sparsegpt", spec, ids, batch_size=2)
    reference = build_tiny_model(family_name, 0)
    _reference_prune(reference, family, ids, _sparsegpt_direct(0.5, nm, granularity, blocksize=32))
    _compare(model, reference, family, weight_atol=2e-4, max_mask_flips=1e-3)


def test_auto_sequential_takes_one_pass_only_when_the_layer_activations_fit(monkeypatch):
    import perp.prune.engine as engine

    ids = calib_ids(4, 32)
    spec = PruneSpec(0.5, blocksize=32)
    model = build_tiny_model("llama", 0)
    estimate = engine.one_pass_activation_bytes(model, ids)
    assert estimate == 4 * 32 * (8 * 64 + 3 * 128) * 4  # tiny LLaMA: hidden 64, intermediate 128, fp32
    runs = {mode: prune_tiny("llama", "sparsegpt", spec, ids, sequential=mode) for mode in ("linear", "layer")}
    small_model, _, small = prune_tiny("llama", "sparsegpt", spec, ids, sequential="auto")
    monkeypatch.setattr(engine, "ONE_PASS_BUDGET_BYTES", estimate - 1)
    large_model, _, large = prune_tiny("llama", "sparsegpt", spec, ids, sequential="auto")
    assert (small.sequential, large.sequential) == ("linear", "layer")
    for model, mode in ((small_model, "linear"), (large_model, "layer")):  # it really ran that mode
        reference = runs[mode][0].state_dict()
        assert all(torch.equal(tensor, reference[name]) for name, tensor in model.state_dict().items())
    linear_weights, layer_weights = runs["linear"][0].state_dict(), runs["layer"][0].state_dict()
    assert not all(torch.equal(linear_weights[name], layer_weights[name]) for name in linear_weights)
    # a 7B layer on the paper's 128 x 2048 calibration set is far over budget in bf16
    seven_b = torch.nn.Linear(1, 1).to(torch.bfloat16)
    seven_b.config = type("Config", (), {"hidden_size": 4096, "intermediate_size": 11008,
                                         "num_attention_heads": 32})()
    assert engine.one_pass_activation_bytes(seven_b, torch.zeros(128, 2048)) > 30 * 2**30


def _reference_prune_true_sequential(model, family, ids, prune_linear):
    """Group by group in forward order, each from a whole-model forward in which every earlier group (this
    layer's included) is already pruned: the definition of sequential="linear"."""
    for layer in family.layers(model):
        linears = family.linears(layer)
        for group in family.linear_groups(layer):
            captured = []
            hook = linears[group[0]].register_forward_hook(
                lambda module, args, out, captured=captured: captured.append(
                    args[0].reshape(-1, args[0].shape[-1]).double()))
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            hook.remove()
            X = torch.cat(captured)
            for name in group:
                with torch.no_grad():
                    linears[name].weight.copy_(prune_linear(linears[name].weight.double(), X).float())


@pytest.mark.parametrize("family_name, method", [("llama", "wanda"), ("opt", "wanda"), ("llama", "sparsegpt")])
def test_true_sequential_mode_matches_direct_reference(family_name, method):
    ids = calib_ids(4, 32)
    spec = PruneSpec(0.5, granularity="row", blocksize=32)
    model, family, result = prune_tiny(family_name, method, spec, ids, sequential="linear")
    reference = build_tiny_model(family_name, 0)
    direct = _wanda_direct(0.5, True) if method == "wanda" else _sparsegpt_direct(0.5, None, "row", blocksize=32)
    _reference_prune_true_sequential(reference, family, ids, direct)
    _compare(model, reference, family, weight_atol=0 if method == "wanda" else 2e-4,
             max_mask_flips=0 if method == "wanda" else 1e-3)
    _assert_pattern(model, family, result, spec)


@pytest.mark.parametrize("nm, granularity", [(None, "matrix"), (None, "row"), ((2, 4), "row")])
def test_sparsegpt_solvers_agree(nm, granularity):
    torch.manual_seed(0)
    X = torch.randn(300, 64) @ (torch.eye(64) + 0.3 * torch.randn(64, 64))
    H, W = X.t() @ X, torch.randn(40, 64)
    spec = PruneSpec(0.5, nm=nm, granularity=granularity, blocksize=32)
    loop_w, loop_m, _ = sparsegpt_prune(W.clone(), H, spec, [16, 24], solver="loop")
    solve_w, solve_m, _ = sparsegpt_prune(W.clone(), H, spec, [16, 24], solver="solve")
    assert torch.equal(loop_m, solve_m)
    assert torch.allclose(loop_w, solve_w, atol=1e-5)


@pytest.mark.parametrize("nm, granularity, dead", [(None, "row", False), (None, "matrix", True), ((2, 4), "row", True)])
def test_sparsegpt_errors_from_its_factorisation_equal_direct_quadratic_forms(nm, granularity, dead):
    torch.manual_seed(1)
    X = torch.randn(400, 96, dtype=torch.float64) @ (torch.eye(96, dtype=torch.float64) + 0.2 * torch.randn(96, 96))
    if dead:
        X[:, [5, 40]] = 0.0  # inputs that never fire: their Hessian diagonal is 0
    H, W = (X.t() @ X).float(), torch.randn(48, 96)
    spec = PruneSpec(0.5, nm=nm, granularity=granularity, blocksize=32)
    pruned, _, info = sparsegpt_prune(W.clone(), H, spec, [16, 32])
    for rows in (slice(0, 16), slice(16, 48)):
        direct = float((((W[rows] - pruned[rows]).double() @ X.t()) ** 2).sum())
        from_obs = delta_energy(W[rows], pruned[rows], info["row_energy"][rows], info["added_diagonal"])
        assert from_obs == pytest.approx(direct, rel=1e-3)
        dense_direct = float(((W[rows].double() @ X.t()) ** 2).sum())
        from_factor = undamped(info["dense_row_energy"][rows], W[rows], info["added_diagonal"])
        assert from_factor == pytest.approx(dense_direct, rel=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_prunes_dead_inputs_first_and_masks_do_not_depend_on_data_repetition(nm):
    """Inputs that never fire cost nothing: their weights go first (the reference zeroes them). The Hessian is an
    unnormalised sum, so repeating the calibration data scales it; the masks must not change."""
    torch.manual_seed(0)
    X = torch.randn(128, 64) * 0.05
    dead = torch.arange(0, 64, 4)  # one input in every group of 4: 16 of 64, within a 50% budget
    X[:, dead] = 0.0
    W, H = torch.randn(192, 64) * 0.02, X.t() @ X
    spec = PruneSpec(0.5, nm=nm, blocksize=32)
    pruned, mask, _ = sparsegpt_prune(W.clone(), H, spec)
    assert mask[:, dead].all()
    _, mask_repeated, _ = sparsegpt_prune(W.clone(), H * 16, spec)  # the same windows, 16 times
    assert torch.equal(mask, mask_repeated)
    zeroed = W.clone()
    zeroed[:, dead] = 0.0  # the reference's treatment: same masks, same weights
    reference, reference_mask, _ = sparsegpt_prune(zeroed, H, spec)
    assert torch.equal(mask, reference_mask) and torch.allclose(pruned, reference, atol=1e-6)


def test_sparsegpt_factorisation_without_scipy_matches_lapack_path(monkeypatch):
    """The torch-only path (used on GPUs) gives the same pruning and energies as the CPU LAPACK/BLAS path."""
    import perp.prune.methods.sparsegpt as sparsegpt

    torch.manual_seed(2)
    X = torch.randn(300, 64) @ (torch.eye(64) + 0.3 * torch.randn(64, 64))
    H, W = X.t() @ X, torch.randn(40, 64)
    spec = PruneSpec(0.5, nm=(2, 4), blocksize=32)
    lapack_w, lapack_m, lapack_info = sparsegpt_prune(W.clone(), H, spec, [16, 24])
    monkeypatch.setattr(sparsegpt, "_strtri", None)
    monkeypatch.setattr(sparsegpt, "_strmm", None)
    torch_w, torch_m, torch_info = sparsegpt_prune(W.clone(), H, spec, [16, 24])
    assert torch.equal(lapack_m, torch_m)
    assert torch.allclose(lapack_w, torch_w, atol=1e-5)
    for key in ("row_energy", "dense_row_energy"):
        assert torch.allclose(lapack_info[key], torch_info[key], rtol=1e-4)


def test_sparsegpt_reduces_reconstruction_error_below_magnitude_and_wanda():
    spec = PruneSpec(0.5, blocksize=32)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        _, _, result = prune_tiny("llama", method, spec, error_tokens=10_000)
        errors[method] = sum(e["rel_error"] for e in result.linears.values())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


# --------------------------------------------------------------------------------------------- reusable pieces


@pytest.mark.parametrize("family_name", ["llama", "opt"])
def test_capture_and_run_layer_reproduce_the_model(family_name):
    model, family = build_tiny_model(family_name, 0), FAMILIES[family_name]
    ids = calib_ids(5, 16)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture_layer_inputs(model, family, ids, "cpu", batch_size=2)
    assert len(inputs) == 3 and inputs.windows == 5 and inputs.tokens == 80
    assert torch.allclose(torch.cat(inputs.hidden), hidden[0], atol=1e-6)
    layer0 = family.layers(model)[0]
    first = run_layer(layer0, inputs.hidden[0], inputs.kwargs[0], inputs.args[0])
    assert torch.allclose(first, hidden[1][:2], atol=1e-5)
    copy = propagate(layer0, inputs, in_place=False)
    assert torch.allclose(torch.cat(copy.hidden), hidden[1], atol=1e-5)
    assert torch.allclose(torch.cat(inputs.hidden), hidden[0], atol=1e-6)  # untouched
    propagate(layer0, inputs)
    assert torch.allclose(torch.cat(inputs.hidden), hidden[1], atol=1e-5)


def test_masks_pack_roundtrip(tmp_path):
    for shape in [(3, 5), (64, 128), (7,)]:
        mask = torch.rand(shape) > 0.4
        packed = pack_mask(mask)
        assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == math.ceil(mask.numel() / 8)
        assert torch.equal(unpack_bits(packed.bits, shape), mask)
        assert packed.count() == int(mask.sum())
    import numpy as np

    mask = torch.rand(9, 13) > 0.5
    assert np.array_equal(pack_mask(mask).bits.numpy(), np.packbits(mask.numpy().ravel(), bitorder="little"))
    save_masks({"a.b": pack_mask(mask)}, tmp_path / "masks.safetensors")
    assert torch.equal(load_masks(tmp_path)["a.b"], mask)


def test_blas_thread_limits_from_concurrent_blocks_combine_and_restore_in_any_order(monkeypatch):
    """Two blocks that leave in the order they entered (a sweep on a thread pool): the smallest request applies
    while both are inside, and the limits from before come back at the end. threadpoolctl's controller is
    replaced by one that records the process-wide BLAS thread count."""
    import perp.prune.stats as stats_module

    class Limiter:
        def __init__(self, owner: "Controller", limits: int) -> None:
            self.owner, self.saved = owner, owner.threads
            owner.threads = limits

        def restore_original_limits(self) -> None:
            self.owner.threads = self.saved

    class Controller:
        threads = 2

        def limit(self, limits: int, user_api: str) -> Limiter:
            assert user_api == "blas"
            return Limiter(self, limits)

    controller = Controller()
    monkeypatch.setattr(stats_module, "_blas_controller", lambda: controller)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def first() -> None:
        with stats_module.blas_threads(1):
            a_inside.set()
            b_inside.wait(30)
            seen["both"] = controller.threads
        a_left.set()

    def second() -> None:
        a_inside.wait(30)
        with stats_module.blas_threads(2):
            b_inside.set()
            a_left.wait(30)
            seen["second_alone"] = controller.threads

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"both": 1, "second_alone": 2}
    assert controller.threads == 2 and stats_module._BLAS_REQUESTS == []


def test_sampled_error_is_the_same_in_fp32_without_native_bf16(monkeypatch):
    import perp.prune.stats as stats_module

    torch.manual_seed(3)
    dense = torch.randn(24, 32)
    pruned = dense * (torch.rand(24, 32) > 0.5)
    stats = stats_module.GroupStats(32, torch.device("cpu"), colsq=True, sample_index=torch.arange(64))
    stats.add(torch.randn(64, 32), 0)
    bf16_or_native, how = stats_module.relative_error(dense, pruned, stats)
    monkeypatch.setattr(stats_module, "native_bf16", lambda device: False)
    fp32, _ = stats_module.relative_error(dense, pruned, stats)
    exact = float(((stats.sample @ (dense - pruned).t()) ** 2).sum() / ((stats.sample @ dense.t()) ** 2).sum())
    assert how == "sampled"
    assert fp32 == pytest.approx(exact, rel=1e-6)
    assert bf16_or_native == pytest.approx(exact, rel=1e-2)


def test_bf16_compute_on_a_cpu_without_native_bf16_warns_and_notes_it(monkeypatch):
    import perp.prune.engine as engine

    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    with pytest.warns(engine.EmulatedPrecisionWarning, match="emulated"):
        _, _, result = prune_tiny("llama", "wanda", PruneSpec(0.5), compute_dtype=torch.bfloat16)
    assert any("emulated" in note for note in result.notes)
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    _, _, result = prune_tiny("llama", "wanda", PruneSpec(0.5), compute_dtype=torch.bfloat16)
    assert not any("emulated" in note for note in result.notes)


# --------------------------------------------------------------------------------------------- OWL


def test_owl_sparsities_average_to_the_target_and_favour_outlier_layers():
    from perp.prune.owl import owl_sparsities

    ratios = {0: 0.010, 1: 0.030, 2: 0.020, 3: 0.050}
    sparsity = owl_sparsities(ratios, 0.6, 0.08)
    assert sum(sparsity.values()) / 4 == pytest.approx(0.6)
    assert sparsity[3] < sparsity[1] < sparsity[2] < sparsity[0]  # more outliers, fewer pruned
    assert max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16)  # the range is 2λ
    assert owl_sparsities({0: 0.02, 1: 0.02}, 0.5, 0.1) == {0: 0.5, 1: 0.5}


def _direct_outlier_ratios(family_name: str, ids: torch.Tensor, m: float) -> dict[int, float]:
    """On the dense model: every Linear's inputs from one plain forward, then |W|·‖X_j‖ per layer."""
    model = build_tiny_model(family_name, 0)
    family = FAMILIES[family_name]
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]).double())) for name, module in family.named_decoder_linears(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    ratios = {}
    for index, layer in enumerate(family.layers(model)):
        prefix = f"{family.layer_prefix(index)}."
        scores = torch.cat([(module.weight.double().abs() * torch.cat(inputs[prefix + name]).norm(dim=0)).flatten()
                            for name, module in family.linears(layer).items()])
        ratios[index] = float((scores > m * scores.mean()).double().mean())
    return ratios


@pytest.mark.parametrize("family_name", ["llama", "opt"])
def test_owl_prunes_each_layer_at_its_own_sparsity_from_dense_outlier_ratios(family_name):
    ids = calib_ids()
    model, family, result = prune_tiny(family_name, "wanda", PruneSpec(0.5), ids, owl_lambda=0.1, owl_m=2.0)
    direct = _direct_outlier_ratios(family_name, ids, 2.0)
    assert result.outlier_ratios.keys() == direct.keys()
    for index, ratio in direct.items():
        assert result.outlier_ratios[index] == pytest.approx(ratio, abs=1e-9)
    assert len(set(result.layer_sparsity.values())) > 1
    assert sum(result.layer_sparsity.values()) / len(result.layer_sparsity) == pytest.approx(0.5)
    for index, layer in enumerate(family.layers(model)):
        for name, module in family.linears(layer).items():
            zeros_per_row = (module.weight == 0).sum(dim=1)
            expected = pruned_per(module.in_features, result.layer_sparsity[index])
            assert torch.all(zeros_per_row == expected), f"layer {index} {name}"


def test_owl_measures_layers_after_an_excluded_layer_on_their_real_inputs_and_leaves_plans_alone():
    ids = calib_ids()
    model = build_tiny_model("llama", 0)
    spec = PruneSpec(0.5)
    plans = plan_pruning(model, LLAMA, ["*"], ["model.layers.0.*"], spec)
    method = create_method("wanda", spec)
    result = prune_model(model, LLAMA, method, plans, ids, EngineOptions(owl_lambda=0.1, owl_m=2.0))
    direct = _direct_outlier_ratios("llama", ids, 2.0)
    assert set(result.outlier_ratios) == {1}
    assert result.outlier_ratios[1] == pytest.approx(direct[1], abs=1e-9)
    assert result.layer_sparsity == {1: pytest.approx(0.5)}  # one layer: nothing to tell apart
    assert all(plan.sparsity is None for plan in plans) and method.spec == spec
    assert not any((module.weight == 0).any() for module in LLAMA.linears(LLAMA.layers(model)[0]).values())


def test_owl_with_an_nm_pattern_is_refused_by_the_engine():
    with pytest.raises(ValueError, match="unstructured"):
        prune_tiny("llama", "wanda", PruneSpec(0.0, nm=(2, 4)), owl_lambda=0.05)
