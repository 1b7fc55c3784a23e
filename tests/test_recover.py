"""Recovery (PERP retraining) on tiny models: methods, masks, init, counts, determinism, outputs, bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perp.config import RECOVER_METHODS, load_params
from perp.errors import ConfigError, OutputError, PerpError
from perp.models import load_model
from perp.models.families import adapter_for, count_parameters
from perp.models.tiny import build_tiny_model, save_tiny_model
from perp.prune import load_masks, run_prune
from perp.recover import (METHODS, DataRepeatWarning, MaskLoRALinear, RecoverError, ScaleLoRALinear, Settings,
                          attach, capture_masks, mask_violations, model_scope, run_recover)
from perp.recover.masklora import _MaskedLoRAFunction
from perp.recover.scalelora import _ScaledLoRAFunction
from perp.recover.train import linear_schedule, optimize

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPARSITY_PRESERVING = ["bias", "norm", "lm_head", "masklora", "scalelora", "full"]


# --------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("single_thread")


@torch.no_grad()
def prune_rows(model: torch.nn.Module, fraction: float = 0.5) -> None:
    """Magnitude pruning per output row: the smallest `fraction` of each row of every decoder Linear to 0."""
    for _, linear in adapter_for(model).named_decoder_linears(model):
        weight = linear.weight
        k = int(weight.shape[1] * fraction)
        weight.scatter_(1, weight.abs().argsort(dim=1)[:, :k], 0.0)


def pruned_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    model = build_tiny_model(family, seed)
    prune_rows(model)
    return model


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory) -> dict[str, Path]:
    """family → pruned tiny checkpoint, plus 'dense-<family>' → its dense original."""
    root = tmp_path_factory.mktemp("recover-models")
    dirs = {}
    for family in ("llama", "opt"):
        dense = save_tiny_model(root / f"dense-{family}", family)
        pruned = save_tiny_model(root / f"pruned-{family}", family)
        model = pruned_tiny(family)
        model.save_pretrained(pruned)
        dirs[family], dirs[f"dense-{family}"] = pruned, dense
    return dirs


def tiny_config(*overrides: str):
    base = [
        "model.device=cpu", "recover.steps=3", "recover.seqlen=32", "recover.batch_size=2", "recover.rank=4",
        "recover.alpha=8", "recover.lr=0.01", "data.calibration.source=embedded:wiki-calib",
        "data.calibration.nsamples=8", "data.evaluation.source=embedded:wiki-eval", "data.evaluation.seqlen=64",
        "data.evaluation.max_windows=2", "evaluate.batch_size=2",
    ]
    return load_params(None, base + list(overrides))


def batches_of(model, n: int = 4, seqlen: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [torch.randint(0, vocab, (2, seqlen), generator=generator) for _ in range(n)]


# --------------------------------------------------------------------------------------------- registry


def test_registry_names_equal_config_names():
    assert METHODS.names() == sorted(RECOVER_METHODS)
    with pytest.raises(ConfigError, match="allowed"):
        METHODS.get("dora")


# --------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("rank", [4, 16])
def test_masklora_and_scalelora_start_at_the_pruned_model(rank):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20)
    with torch.no_grad():
        base.weight[torch.rand_like(base.weight) < 0.5] = 0.0
    x = torch.randn(3, 5, 24)
    expected = base(x)
    masked = MaskLoRALinear(base, rank, alpha=2 * rank)
    assert torch.equal(masked(x), expected)  # B = 0: bit for bit
    assert torch.equal(masked.lora_B, torch.zeros_like(masked.lora_B))
    scaled = ScaleLoRALinear(base, rank)
    assert torch.equal(scaled.lora_B @ scaled.lora_A, torch.ones(20, 24))  # 1/√r · 1/√r · r = 1 for r = 4, 16
    assert torch.equal(scaled(x), expected)


def test_scalelora_init_is_ones_to_float_precision_for_any_rank():
    base = torch.nn.Linear(8, 6)
    scaled = ScaleLoRALinear(base, 3)
    assert torch.allclose(scaled.lora_B @ scaled.lora_A, torch.ones(6, 8), atol=1e-6)


def test_custom_backward_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    out_f, in_f, r, s = 5, 7, 3, 0.75
    weight = torch.randn(out_f, in_f, dtype=torch.float64)
    weight[torch.rand_like(weight) < 0.5] = 0.0
    keep = (weight != 0).double()
    x = torch.randn(2, 4, in_f, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _MaskedLoRAFunction.apply(t[0], weight, t[1], t[2], t[3], s),
                                    (x, bias, a, b))
    assert torch.autograd.gradcheck(lambda *t: _ScaledLoRAFunction.apply(t[0], weight, t[1], t[2], t[3]),
                                    (x, bias, a, b))
    # And the forward is the paper's formula.
    ref = torch.nn.functional.linear(x, weight + s * (b @ a) * keep, bias)
    assert torch.allclose(_MaskedLoRAFunction.apply(x, weight, bias, a, b, s), ref)
    ref = torch.nn.functional.linear(x, weight * (b @ a), bias)
    assert torch.allclose(_ScaledLoRAFunction.apply(x, weight, bias, a, b), ref)


@pytest.mark.parametrize("method", ["lm_head", "lora", "masklora", "scalelora", "norm+bias+masklora"])
def test_attached_model_computes_the_pruned_model(method):
    model = pruned_tiny("opt")
    ids = batches_of(model, 1)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    attach(model_scope(model, adapter_for(model)), method.split("+"), Settings(rank=16, alpha=32))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


# --------------------------------------------------------------------------------------------- selection


def _linear_lora_params(model, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for _, m in adapter_for(model).named_decoder_linears(model))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_trainable_parameter_counts(family):
    rank = 4
    reference = pruned_tiny(family)
    hidden, vocab = reference.config.hidden_size, reference.config.vocab_size
    norm_params = sum(p.numel() for _, m in adapter_for(reference).named_norms(reference) for p in m.parameters())
    bias_params = sum(p.numel() for n, p in reference.named_parameters() if n.endswith(".bias"))
    expected = {
        "norm": norm_params,
        "bias": bias_params,
        "lm_head": rank * (hidden + vocab),
        "lora": _linear_lora_params(reference, rank),
        "masklora": _linear_lora_params(reference, rank),
        "scalelora": _linear_lora_params(reference, rank),
        "full": count_parameters(reference),
    }
    if family == "llama":
        assert expected["norm"] == 2 * 2 * hidden + hidden and expected["bias"] == 0
    for method, count in expected.items():
        model = pruned_tiny(family)
        attachment = attach(model_scope(model, adapter_for(model)), [method], Settings(rank=rank, alpha=8))
        assert attachment.trainable_params == count, method
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in attachment.unique_params()}, method
        assert all(p.dtype == torch.float32 for p in attachment.unique_params())


def test_frozen_weights_get_no_gradient_and_no_optimizer_state():
    model = pruned_tiny("llama")
    attachment = attach(model_scope(model, adapter_for(model)), ["norm", "masklora"], Settings(rank=4, alpha=8))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for _, m in adapter_for(model).named_decoder_linears(model)
                          for p in [m.weight])
    ids = batches_of(model, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in attachment.unique_params())


# --------------------------------------------------------------------------------------------- masks hold


def _effective_weights(model):
    """name → the weight the forward uses (adapters included), for every decoder Linear."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (MaskLoRALinear, ScaleLoRALinear)):
            out[name] = module.effective_weight()
        elif isinstance(module, torch.nn.Linear) and name.startswith(("model.layers", "model.decoder.layers")) \
                and ".base" not in name and "lora_" not in name:
            out[name] = module.weight.detach()
    return out


def _zero_violations(weights, masks):
    """Pruned positions that are not zero (during training a product may give -0.0, which still multiplies to 0)."""
    kept = {n: m.unpack() for n, m in masks.items()}
    return {n: int((w[~kept[n]] != 0).sum()) for n, w in weights.items() if n in kept and (w[~kept[n]] != 0).any()}


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", SPARSITY_PRESERVING + ["norm+bias+lm_head+masklora"])
def test_masks_hold_after_every_step_and_bit_for_bit_after_merge(family, method):
    if family == "llama" and method == "bias":
        pytest.skip("LLaMA has no biases")
    model = pruned_tiny(family)
    family_adapter = adapter_for(model)
    scope = model_scope(model, family_adapter)
    masks = capture_masks(scope.linears)
    assert len(masks) == len(scope.linears)
    before = {n: m.weight.detach().clone() for n, m in scope.linears.items()}
    attachment = attach(scope, method.split("+"), Settings(rank=4, alpha=8, seed=1))
    config = tiny_config("recover.steps=4", "recover.lr=0.05", "recover.weight_decay=0.1").recover
    batches = iter(batches_of(model, 4))
    checked = []

    def loss():
        ids = next(batches)
        return model(input_ids=ids, labels=ids).loss, ids.numel()

    def on_step(step, _):
        assert _zero_violations(_effective_weights(model), masks) == {}, f"step {step}"
        checked.append(step)

    model.train()
    optimize(attachment, config, loss, torch.device("cpu"), torch.float32, on_step)
    assert checked == [1, 2, 3, 4]
    attachment.merge()
    merged = dict(family_adapter.named_decoder_linears(model))
    assert all(type(m) is torch.nn.Linear for m in merged.values())  # adapters folded away
    assert mask_violations(((n, m.weight) for n, m in merged.items()), masks) == {}  # +0.0 exactly
    changed = any(not torch.equal(merged[n].weight, before[n]) for n in merged)
    assert changed == any(m in method for m in ("masklora", "scalelora", "full"))
    assert not any(p.requires_grad for p in model.parameters())


def test_plain_lora_merge_is_dense():
    model = pruned_tiny("llama")
    scope = model_scope(model, adapter_for(model))
    attachment = attach(scope, ["lora"], Settings(rank=4, alpha=8))
    batches = iter(batches_of(model, 2))

    def loss():
        ids = next(batches)
        return model(input_ids=ids, labels=ids).loss, ids.numel()

    optimize(attachment, tiny_config("recover.steps=2").recover, loss, torch.device("cpu"), torch.float32)
    attachment.merge()
    assert adapter_for(model).decoder_sparsity(model)["sparsity"] < 0.01


# --------------------------------------------------------------------------------------------- training loop


def test_linear_warmup_then_linear_decay():
    factor = linear_schedule(20, 0.1)
    assert [factor(s) for s in range(3)] == [0.5, 1.0, 1.0]
    assert factor(19) == pytest.approx(1 / 18) and factor(10) == pytest.approx(10 / 18)
    assert linear_schedule(5, 0.0)(0) == 1.0


def test_gradient_checkpointing_and_accumulation_match_the_plain_step():
    def run(*overrides):
        model = pruned_tiny("llama")
        attachment = attach(model_scope(model, adapter_for(model)), ["norm", "masklora"], Settings(rank=4, alpha=8))
        config = tiny_config("recover.steps=2", *overrides).recover
        batches = iter(b for batch in batches_of(model, 2, seqlen=16) for b in batch.split(config.batch_size))
        from perp.recover.train import train_end2end

        result = train_end2end(model, attachment, batches, config, torch.device("cpu"), torch.float32)
        return result.loss_curve, [p.detach().clone() for p in attachment.unique_params()]

    plain_curve, plain = run()
    ckpt_curve, ckpt = run("recover.gradient_checkpointing=true")
    assert [loss for _, loss in plain_curve] == pytest.approx([loss for _, loss in ckpt_curve], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))
    accum_curve, accum = run("recover.batch_size=1", "recover.grad_accum=2")
    assert [loss for _, loss in plain_curve] == pytest.approx([loss for _, loss in accum_curve], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, accum))


@pytest.mark.parametrize("family, method", [("llama", "norm+lm_head+masklora"), ("opt", "full"),
                                            ("llama", "bias+scalelora")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_loss_matches_the_model_loss_and_its_gradients(family, method, checkpointing):
    from perp.recover.loss import causal_lm_loss, chunkable
    from perp.recover.train import _checkpointing

    def loss_and_grads(chunk_bytes):
        torch.manual_seed(1)
        model = pruned_tiny(family)
        attachment = attach(model_scope(model, adapter_for(model)), method.split("+"), Settings(rank=4, alpha=8))
        with torch.no_grad():  # non-zero adapters, so every trainable parameter gets a gradient
            for param in attachment.unique_params():
                param.add_(0.01 * torch.randn_like(param))
        if checkpointing:
            _checkpointing(model, True)
        model.train()
        ids = batches_of(model, 1, seqlen=24)[0]
        loss = causal_lm_loss(model, ids) if chunk_bytes is None else causal_lm_loss(model, ids, 0, chunk_bytes)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in attachment.unique_params()]

    model_loss, model_grads = loss_and_grads(None)  # tiny: the whole micro-batch fits, the model's own loss
    vocab = pruned_tiny(family).config.vocab_size
    chunked_loss, chunked_grads = loss_and_grads(7 * vocab * 4)  # 7 tokens of logits per chunk: 46 tokens, 7 chunks
    assert chunkable(pruned_tiny(family))
    assert torch.allclose(chunked_loss, model_loss, rtol=1e-6)
    assert len(chunked_grads) == len(model_grads) > 0
    for chunked, reference in zip(chunked_grads, model_grads):
        assert torch.allclose(chunked, reference, rtol=1e-4, atol=1e-7)


def test_chunked_loss_refuses_heads_that_are_not_plain():
    from perp.recover.loss import chunkable

    model = pruned_tiny("llama")
    assert chunkable(model)
    model.config.final_logit_softcapping = 30.0
    assert not chunkable(model)


@pytest.mark.parametrize("method", ["norm+lm_head+masklora", "scalelora", "full"])
def test_half_precision_model_trains_fp32_masters_under_autocast(method):
    """A bf16 model (the GPU default) trains under bf16 autocast with fp32 trainable parameters; on CPU here."""
    from perp.recover.train import train_end2end

    model = pruned_tiny("llama").to(torch.bfloat16)
    scope = model_scope(model, adapter_for(model))
    masks = capture_masks(scope.linears)
    attachment = attach(scope, method.split("+"), Settings(rank=4, alpha=8))
    assert all(p.dtype == torch.float32 for p in attachment.unique_params())
    config = tiny_config("recover.steps=2").recover
    result = train_end2end(model, attachment, iter(batches_of(model, 2)), config, torch.device("cpu"), torch.bfloat16)
    assert all(math.isfinite(loss) for _, loss in result.loss_curve)
    attachment.merge()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    merged = adapter_for(model).named_decoder_linears(model)
    assert mask_violations(((n, m.weight) for n, m in merged), masks) == {}


# --------------------------------------------------------------------------------------------- run_recover


REPORT_KEYS = {
    "method", "methods", "mode", "trainable_params", "trainable_fraction", "total_params", "loss_curve", "ppl_before",
    "ppl_after", "seconds", "tokens_per_second", "peak_memory_bytes", "data_sha256", "dense_result",
    "tied_embeddings_action", "config",
}


def test_end2end_outputs_report_and_reload(pruned_dirs, tmp_path):
    out = tmp_path / "rec"
    report = run_recover(tiny_config("recover.method=norm+bias+lm_head+masklora", "recover.steps=4"),
                         str(pruned_dirs["opt"]), out)
    assert REPORT_KEYS <= set(report)
    assert report["methods"] == ["norm", "bias", "lm_head", "masklora"] and report["mode"] == "end2end"
    assert len(report["loss_curve"]) == 4 and [s for s, _ in report["loss_curve"]] == [1, 2, 3, 4]
    assert report["dense_result"] is False and report["masks_held"] is True
    assert report["tied_embeddings_action"].startswith("untied")
    assert 0 < report["trainable_fraction"] < 1 and report["peak_memory_bytes"] > 0
    assert report["tokens_per_second"] > 0 and report["tokens"] == 4 * 2 * 32
    assert math.isfinite(report["ppl_before"]) and math.isfinite(report["ppl_after"])
    assert report["sparsity_after"]["zeros"] >= report["sparsity_before"]["zeros"]
    assert json.loads((out / "recover_report.json").read_text())["data_sha256"] == report["data_sha256"]
    adapter = load_file(str(out / "adapter.safetensors"))
    assert "lm_head.lora_A" in adapter and "model.decoder.layers.0.self_attn.q_proj.lora_B" in adapter
    assert sum(t.numel() for t in adapter.values()) == report["trainable_params"]

    # The merged checkpoint reloads to the reported perplexity, sparse, with the head untied.
    recovered, pruned = load_model(str(out), device="cpu"), load_model(str(pruned_dirs["opt"]), device="cpu")
    assert recovered.family.ties_embeddings(recovered.model) is False
    assert recovered.model.config.tie_word_embeddings is False
    embed = lambda m: m.family.embeddings(m.model)[0].weight  # noqa: E731
    assert torch.equal(embed(recovered), embed(pruned))  # the input embeddings did not change
    assert not torch.equal(recovered.family.lm_head(recovered.model).weight, embed(pruned))
    masks = capture_masks(dict(pruned.family.named_decoder_linears(pruned.model)))
    weights = ((n, m.weight) for n, m in recovered.family.named_decoder_linears(recovered.model))
    assert mask_violations(weights, masks) == {}
    from perp.data import evaluation_set
    from perp.evaluate import perplexity

    config = tiny_config()
    ppl = perplexity(recovered.model, evaluation_set(config.data.evaluation, recovered.tokenizer), 2).ppl
    assert ppl == pytest.approx(report["ppl_after"], rel=1e-5)


def test_lora_baseline_reports_a_dense_result(pruned_dirs, tmp_path):
    report = run_recover(tiny_config("recover.method=lora", "recover.steps=2"), str(pruned_dirs["llama"]),
                         tmp_path / "lora")
    assert report["dense_result"] is True and report["masks_held"] is False
    assert report["sparsity_after"]["sparsity"] < 0.01
    assert report["tied_embeddings_action"].startswith("not tied")


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_full_reports_that_it_retrained_the_lm_head(pruned_dirs, tmp_path, family):
    """`full` trains every weight, the LM head (and, tied, the embedding it shares) included."""
    out = tmp_path / "full"
    report = run_recover(tiny_config("recover.method=full", "recover.steps=2"), str(pruned_dirs[family]), out)
    pruned, recovered = load_model(str(pruned_dirs[family]), device="cpu"), load_model(str(out), device="cpu")
    head = lambda m: m.family.lm_head(m.model).weight  # noqa: E731
    assert not torch.equal(head(recovered), head(pruned))
    tied = pruned.family.ties_embeddings(pruned.model)
    assert tied == (family == "opt") and recovered.family.ties_embeddings(recovered.model) == tied
    assert report["tied_embeddings_action"].startswith("tied, retrained" if tied else "not tied; full fine-tuning "
                                                       "retrained the LM head")


def test_end2end_refuses_a_damaged_dense_reference_before_loading(pruned_dirs, tmp_path, model_loads):
    """End to end only records --dense, as evaluation's baseline: a damaged one was found there, after training."""
    import shutil

    from perp.errors import ModelSourceError

    dense = tmp_path / "dense"
    shutil.copytree(pruned_dirs["dense-llama"], dense)
    weights = dense / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelSourceError, match="truncated"):
        run_recover(tiny_config("recover.method=norm"), str(pruned_dirs["llama"]), tmp_path / "out", dense=str(dense))
    assert model_loads == [] and not (tmp_path / "out").exists()


def test_end2end_is_deterministic_for_a_seed(pruned_dirs, tmp_path):
    config = tiny_config("recover.method=norm+masklora", "recover.steps=3", "recover.seed=7")
    first = run_recover(config, str(pruned_dirs["llama"]), tmp_path / "a")
    second = run_recover(config, str(pruned_dirs["llama"]), tmp_path / "b")
    assert first["loss_curve"] == second["loss_curve"] and first["ppl_after"] == second["ppl_after"]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = run_recover(tiny_config("recover.method=norm+masklora", "recover.steps=3", "recover.seed=8"),
                        str(pruned_dirs["llama"]), tmp_path / "c")
    assert other["loss_curve"] != first["loss_curve"]


def test_data_repeat_warns_once(pruned_dirs, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_recover(tiny_config("recover.steps=6", "data.calibration.nsamples=4"),
                             str(pruned_dirs["llama"]), tmp_path / "r")
    repeats = [w for w in caught if issubclass(w.category, DataRepeatWarning)]
    assert len(repeats) == 1 and "repeat" in str(repeats[0].message)
    assert report["data"]["data_repeats"] is True and report["data"]["windows_needed"] == 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_recover(tiny_config("recover.steps=2"), str(pruned_dirs["llama"]), tmp_path / "s")
    assert not [w for w in caught if issubclass(w.category, DataRepeatWarning)]


def test_interrupted_run_leaves_no_output(pruned_dirs, tmp_path):
    out = tmp_path / "interrupted"

    def progress(stage, done, total, status):
        if stage == "train" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recover(tiny_config("recover.steps=5"), str(pruned_dirs["llama"]), out, progress=progress)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- layer-wise


@pytest.mark.parametrize("family, method", [("llama", "norm+masklora"), ("opt", "bias+scalelora")])
def test_layerwise_reduces_every_block_mse_and_holds_masks(pruned_dirs, tmp_path, family, method):
    config = tiny_config("recover.mode=layerwise", f"recover.method={method}", "recover.steps=15",
                         "recover.lr=0.005")
    report = run_recover(config, str(pruned_dirs[family]), tmp_path / "lw", dense=str(pruned_dirs[f"dense-{family}"]))
    assert REPORT_KEYS <= set(report) and report["mode"] == "layerwise"
    assert len(report["blocks"]) == 2 and len(report["loss_curve"]) == 2 * 15
    for block in report["blocks"]:
        assert block["mse_after"] < block["mse_before"], block
    recovered = load_model(str(tmp_path / "lw"), device="cpu")
    pruned = load_model(str(pruned_dirs[family]), device="cpu")
    masks = capture_masks(dict(pruned.family.named_decoder_linears(pruned.model)))
    assert mask_violations(((n, m.weight) for n, m in recovered.family.named_decoder_linears(recovered.model)),
                           masks) == {}
    adapter = load_file(str(tmp_path / "lw" / "adapter.safetensors"))
    assert any(key.startswith(recovered.family.layer_prefix(1)) for key in adapter)


def test_recovers_a_checkpoint_from_the_prune_stage(tiny_llama_dir, tmp_path):
    """perp prune → perp recover (layer-wise): the pruner's masks hold and travel with the recovered model."""
    pruned_dir = tmp_path / "pruned"
    prune_config = tiny_config(f"model.name={tiny_llama_dir}", "prune.method=wanda", "prune.sparsity=0.5",
                               "data.calibration.seqlen=32")
    run_prune(prune_config, pruned_dir)
    out = tmp_path / "recovered"
    report = run_recover(tiny_config("recover.mode=layerwise", "recover.method=norm+masklora", "recover.steps=5"),
                         str(pruned_dir), out, dense=str(tiny_llama_dir))
    assert report["sparsity_after"]["zeros"] == report["sparsity_before"]["zeros"]
    kept = load_masks(out)
    recovered = load_model(str(out), device="cpu")
    for name, linear in recovered.family.named_decoder_linears(recovered.model):
        assert torch.equal(linear.weight[~kept[name]], torch.zeros_like(linear.weight[~kept[name]]))


def test_fused_with_pruning_reconstructs_each_block_right_after_pruning_it(tiny_llama_dir, tmp_path):
    """Prune block i, reconstruct block i, move on: one output with both reports; masks hold; every block's MSE to
    the dense block falls; the pruning report and masks are those of the pruner."""
    from perp.recover.fused import run_fused

    out = tmp_path / "fused"
    config = tiny_config(f"model.name={tiny_llama_dir}", "prune.method=wanda", "prune.sparsity=0.5",
                         "data.calibration.seqlen=32", "prune.sequential=auto", "recover.method=norm+masklora",
                         "recover.steps=15", "recover.lr=0.005")
    result = run_fused(config, out)
    prune_report, report = result["prune"], result["recover"]
    assert prune_report["engine"]["sequential"] == "layer"  # auto resolves to the two-pass mode
    assert {"targets", "reconstruct"} <= set(prune_report["timings"])
    assert report["fused_with_pruning"] is True and report["mode"] == "layerwise"
    assert len(report["blocks"]) == 2 and len(report["loss_curve"]) == 2 * 15
    for block in report["blocks"]:
        assert block["mse_after"] < block["mse_before"], block
    assert report["data"]["sha256"] == prune_report["calibration"]["sha256"]  # trained on the calibration windows
    on_disk = json.loads((out / "recover_report.json").read_text())
    assert on_disk["ppl_after"] == report["ppl_after"] and (out / "prune_report.json").is_file()
    kept = load_masks(out)
    recovered = load_model(str(out), device="cpu")
    assert len(kept) == 2 * 7
    for name, linear in recovered.family.named_decoder_linears(recovered.model):
        assert torch.equal(linear.weight[~kept[name]], torch.zeros_like(linear.weight[~kept[name]]))
    adapter = load_file(str(out / "adapter.safetensors"))
    assert any(key.startswith(recovered.family.layer_prefix(1)) and "lora_B" in key for key in adapter)
    # Pruning alone gives block 0 the same masks (its inputs are the same) but not the retrained weights; block 1
    # is pruned on the outputs of the reconstructed block 0 instead of the merely pruned one.
    plain = tmp_path / "plain"
    run_prune(config.model_copy(update={"prune": config.prune.model_copy(update={"sequential": "layer"})}), plain)
    prefix = recovered.family.layer_prefix(0)
    assert all(torch.equal(kept[name], mask) for name, mask in load_masks(plain).items() if name.startswith(prefix))
    pruned = load_model(str(plain), device="cpu")
    differ = [name for (name, a), (_, b) in zip(pruned.family.named_decoder_linears(pruned.model),
                                                recovered.family.named_decoder_linears(recovered.model))
              if not torch.equal(a.weight, b.weight)]
    assert len(differ) == 2 * 7


def test_fused_refuses_what_it_cannot_run(tiny_llama_dir, tmp_path):
    from perp.recover.fused import run_fused

    base = (f"model.name={tiny_llama_dir}", "data.calibration.seqlen=32")
    with pytest.raises(ConfigError, match="prune.sequential"):
        run_fused(tiny_config(*base, "prune.sequential=linear", "recover.method=masklora"), tmp_path / "x")
    with pytest.raises(RecoverError, match="trains nothing inside decoder blocks"):
        run_fused(tiny_config(*base, "recover.method=lm_head"), tmp_path / "x")
    with pytest.raises(RecoverError, match="no biases"):
        run_fused(tiny_config(*base, "recover.method=bias"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_layerwise_runs_layernorm_models_in_bf16_on_cpu(pruned_dirs, tmp_path):
    """OPT's LayerNorm on CPU refuses fp32 inputs with bf16 weights: block inputs are kept in the model's dtype."""
    config = tiny_config("recover.mode=layerwise", "recover.method=masklora", "model.dtype=bfloat16",
                         "recover.steps=2")
    report = run_recover(config, str(pruned_dirs["opt"]), tmp_path / "lw", dense=str(pruned_dirs["dense-opt"]))
    assert report["dtype"] == "bfloat16" and len(report["blocks"]) == 2


def test_layerwise_refuses_a_pruned_model_as_the_dense_reference(pruned_dirs, tmp_path):
    with pytest.raises(RecoverError, match="looks pruned, not dense"):
        run_recover(tiny_config("recover.mode=layerwise"), str(pruned_dirs["llama"]), tmp_path / "x",
                    dense=str(pruned_dirs["llama"]))
    assert not (tmp_path / "x").exists()


def test_windows_longer_than_the_model_positions_are_refused_before_loading(pruned_dirs, tmp_path, monkeypatch):
    import perp.recover.run as recover_run

    limit = json.loads((pruned_dirs["llama"] / "config.json").read_text())["max_position_embeddings"]
    monkeypatch.setattr(recover_run, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for override in (f"recover.seqlen={limit + 1}", f"data.evaluation.seqlen={limit + 1}"):
        with pytest.raises(RecoverError, match=f"exceed the {limit} positions"):
            run_recover(tiny_config(override), str(pruned_dirs["llama"]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_disk_too_small_for_the_recovered_checkpoint_fails_before_loading(pruned_dirs, tmp_path, monkeypatch,
                                                                            full_disk):
    import perp.recover.run as recover_run

    monkeypatch.setattr(recover_run, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    disk = full_disk(tmp_path / "disk")
    for mode in ("end2end", "layerwise"):
        with pytest.raises(OutputError, match="recovered checkpoint with its adapter needs about .* has 1.0 MiB free"):
            run_recover(tiny_config(f"recover.mode={mode}"), str(pruned_dirs["llama"]), disk / "x",
                        dense=str(pruned_dirs["dense-llama"]) if mode == "layerwise" else None)
    assert not (disk / "x").exists()


def _weights_written(out: Path) -> int:
    return sum(path.stat().st_size for path in out.glob("*.safetensors"))


@pytest.fixture
def space_asked(monkeypatch) -> list[int]:
    """The bytes each free-space check asked for (the checks still run)."""
    import perp.prune.run
    import perp.recover.run

    asked: list[int] = []
    for module in (perp.prune.run, perp.recover.run):
        real = module.require_free_space

        def record(target, needed, *args, real=real, **kwargs):
            asked.append(needed)
            return real(target, needed, *args, **kwargs)

        monkeypatch.setattr(module, "require_free_space", record)
    return asked


@pytest.mark.parametrize("family, method, mode", [
    ("opt", "masklora+lm_head", "end2end"), ("opt", "scalelora+norm", "layerwise"), ("opt", "lora", "end2end"),
    ("llama", "lm_head", "end2end"),
])
def test_the_space_asked_for_is_what_recovery_writes(pruned_dirs, tmp_path, space_asked, family, method, mode):
    """Tied OPT: the LM head's LoRA unties it (a second copy of the head); untied LLaMA: no copy. The masks are
    copied when kept."""
    dense = str(pruned_dirs[f"dense-{family}"])
    source = tmp_path / "pruned"
    run_prune(tiny_config(f"model.name={dense}", "prune.method=magnitude", "data.calibration.seqlen=32"), source)
    out = tmp_path / "recovered"
    run_recover(tiny_config(f"recover.method={method}", f"recover.mode={mode}", "recover.steps=1"), str(source), out,
                dense=dense if mode == "layerwise" else None)
    written = _weights_written(out)
    assert space_asked[-1] <= written < space_asked[-1] + 16 * 1024  # every tensor counted; headers are not


def test_the_space_asked_for_is_what_a_fused_run_writes(tiny_llama_dir, tmp_path, space_asked):
    from perp.recover.fused import run_fused

    out = tmp_path / "fused"
    run_fused(tiny_config(f"model.name={tiny_llama_dir}", "prune.method=wanda", "data.calibration.seqlen=32",
                          "recover.method=norm+masklora", "recover.steps=1"), out)
    written = _weights_written(out)
    assert space_asked[-1] <= written < space_asked[-1] + 16 * 1024


# --------------------------------------------------------------------------------------------- bad input


def test_unpruned_model_is_refused_for_sparsity_preserving_methods(pruned_dirs, tmp_path):
    for method in ("masklora", "norm"):
        with pytest.raises(RecoverError, match="never pruned"):
            run_recover(tiny_config(f"recover.method={method}"), str(pruned_dirs["dense-llama"]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_requests_fail_before_training(pruned_dirs, tmp_path):
    model = str(pruned_dirs["llama"])
    with pytest.raises(RecoverError, match="needs the dense reference"):
        run_recover(tiny_config("recover.mode=layerwise"), model, tmp_path / "x")
    with pytest.raises(RecoverError, match="trains nothing inside decoder blocks"):
        run_recover(tiny_config("recover.mode=layerwise", "recover.method=lm_head"), model, tmp_path / "x",
                    dense=str(pruned_dirs["dense-llama"]))
    with pytest.raises(RecoverError, match="no biases"):
        run_recover(tiny_config("recover.method=bias"), model, tmp_path / "x")
    with pytest.raises(RecoverError, match="not the dense version"):
        run_recover(tiny_config("recover.mode=layerwise"), model, tmp_path / "x", dense=str(pruned_dirs["dense-opt"]))
    with pytest.raises(ConfigError, match="recover.rank: LoRA rank must be > 0"):
        tiny_config("recover.rank=0")
    with pytest.raises(ConfigError, match="recover.lr: must be a finite number > 0"):
        tiny_config("recover.lr=-1e-3")
    config = tiny_config()
    object.__setattr__(config.recover, "lr", 0.0)  # a config built around validation is still refused
    with pytest.raises(RecoverError, match="learning rate must be > 0"):
        run_recover(config, model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert issubclass(RecoverError, PerpError)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_recover_json_and_one_line_errors(cli, pruned_dirs, tmp_path):
    out = tmp_path / "cli-out"
    result = cli("recover", "--model", str(pruned_dirs["llama"]), "--method", "norm+masklora", "--steps", "2",
                 "--seqlen", "32", "--rank", "4", "--data", "embedded:wiki-calib", "--nsamples", "4", "--out", str(out),
                 "-S", "data.evaluation.seqlen=64", "-S", "data.evaluation.max_windows=1", "-S", "model.device=cpu",
                 "--json", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "norm+masklora" and report["data"]["windows"] == 4
    assert (out / "recover_report.json").is_file() and (out / "model.safetensors").is_file()

    bad = cli("recover", "--model", str(pruned_dirs["llama"]), "--mode", "layerwise", "--out", str(tmp_path / "y"),
              cwd=tmp_path, env=ONE_THREAD)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--dense" in lines[0]


def test_bias_alone_trains_layernorm_models_in_bf16_on_cpu(pruned_dirs, tmp_path):
    """Only the LayerNorm biases train (fp32 masters) next to frozen bf16 LayerNorm weights: the norm runs with
    one dtype during training, and the merged model is bf16 again."""
    report = run_recover(tiny_config("recover.method=bias", "model.dtype=bfloat16", "recover.steps=2"),
                         str(pruned_dirs["opt"]), tmp_path / "b")
    recovered = load_model(str(tmp_path / "b"), device="cpu", dtype="bfloat16")
    assert report["dtype"] == "bfloat16" and report["trainable_params"] > 0
    assert {p.dtype for p in recovered.model.parameters()} == {torch.bfloat16}


def test_fused_refuses_dense_merges_unused_options_and_its_own_calibration_set(tiny_llama_dir, tmp_path, cli):
    from perp.recover.fused import run_fused

    with pytest.raises(ConfigError, match="'lora' merges into dense weights"):
        run_fused(tiny_config(f"model.name={tiny_llama_dir}", "recover.method=lora"), tmp_path / "x")
    result = cli("recover", "--fused", "--model", str(tiny_llama_dir), "--seqlen", "64", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "drop --seqlen" in result.stderr
    calib = tmp_path / "calib"
    made = cli("calibrate", "--model", str(tiny_llama_dir), "-S", "data.calibration.nsamples=2",
               "-S", "data.calibration.seqlen=32", "--out", str(calib))
    assert made.returncode == 0, made.stderr
    for command in (["recover", "--fused"], ["prune"]):
        result = cli(*command, "--model", str(tiny_llama_dir), "--calib-set", str(calib), "--out", str(calib))
        assert result.returncode == 2 and "would replace the input" in result.stderr, result.stderr
    assert (calib / "calibration.safetensors").is_file()
    assert not (tmp_path / "x").exists()


def test_fused_precision_is_the_trainings_and_dense_before_is_no_regression(tiny_llama_dir, tmp_path):
    from perp.recover.fused import run_fused

    config = tiny_config(f"model.name={tiny_llama_dir}", "data.calibration.seqlen=32", "recover.method=norm",
                         "recover.steps=2", "prune.compute_dtype=bfloat16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_fused(config, tmp_path / "f")
    assert result["prune"]["engine"]["compute_dtype"] == "float32"  # fp32 model on CPU trains without autocast
    assert any("training's precision" in note for note in result["prune"]["notes"])
    assert "worse_than_before" not in result["recover"]  # 'before' is the dense model
    assert not [w for w in caught if "worse" in str(w.message)]
