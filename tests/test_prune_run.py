"""`run_prune` and `perp prune`: outputs (checkpoint, masks, report), reload with plain transformers, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from perp.config import load_params
from perp.data.windows import TokenSet
from perp.errors import (ConfigError, DataSourceError, ModelSourceError, OutputError, PerpError,
                         UnsupportedArchitectureError)
from perp.prune import MASKS_FILE, REPORT_FILE, load_masks, run_prune
from perp.prune.patterns import pruned_per


pytestmark = pytest.mark.usefixtures("single_thread")


def _calib(windows: int = 4, seqlen: int = 32) -> TokenSet:
    ids = torch.randint(3, 259, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    return TokenSet(ids, "test:random", {"seed": 0})


def _config(model: str | Path, *sets: str):
    return load_params(None, [f"model.name={model}", "model.device=cpu", *sets])


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    from perp.models.tiny import byte_tokenizer, tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tied-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def _reload_and_compare(out: Path, pruned_state: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = reloaded.state_dict()
    for name, tensor in pruned_state.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("method, sets", [
    ("sparsegpt", ["prune.pattern=2:4"]),
    ("wanda", ["prune.sparsity=0.5"]),
])
def test_outputs_reload_with_plain_transformers(tied_llama_dir, tmp_path, method, sets):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    config = _config(tied_llama_dir, f"prune.method={method}", "prune.blocksize=32", *sets)
    calib = _calib()
    report = run_prune(config, out, calib=calib)

    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied
    dense = AutoModelForCausalLM.from_pretrained(tied_llama_dir, dtype=torch.float32)
    assert torch.equal(reloaded.model.embed_tokens.weight, dense.model.embed_tokens.weight)

    masks = load_masks(out)
    linears = {name: module for name, module in reloaded.named_modules() if name in masks}
    assert len(masks) == 14 and set(linears) == set(masks)
    for name, kept in masks.items():
        weight = linears[name].weight
        assert kept.dtype == torch.bool and kept.shape == weight.shape
        assert torch.equal(weight != 0, kept), name
        assert not torch.signbit(weight[~kept]).any(), f"{name}: -0.0 at a pruned position"

    assert report == json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == method and report["target_sparsity"] == 0.5
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert set(report["layers"]) == set(masks)
    entry = report["layers"]["model.layers.0.self_attn.q_proj"]
    assert entry["sparsity"] == pytest.approx(0.5) and 0 < entry["rel_error"] < 1
    assert report["calibration"]["sha256"] == calib.hash
    assert report["base_model"]["sha256"] and report["config"]["prune"]["method"] == method
    assert {"load", "capture", "stats", "solve", "propagate", "save", "total"} <= set(report["timings"])
    assert report["peak_memory_bytes"] > 0

    # the output reloads through perp too, with the same weights
    from perp.models import load_model

    again = load_model(str(out), "cpu", "float32")
    _reload_and_compare(out, {k: v for k, v in again.model.state_dict().items()})


def test_opt_checkpoint_reloads_and_matches(tiny_opt_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from perp.models import load_model

    out = tmp_path / "opt"
    run_prune(_config(tiny_opt_dir, "prune.method=wanda", "prune.pattern=4:8"), out, calib=_calib())
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    masks = load_masks(out / MASKS_FILE)
    assert any(name.startswith("model.decoder.layers.1.fc2") for name in masks)
    ours = load_model(str(out), "cpu", "float32").model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_run_prune_reads_calibration_from_config(tiny_llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i}" for i in range(400)))
    config = _config(tiny_llama_dir, "prune.method=magnitude", f"data.calibration.source={text}",
                     "data.calibration.nsamples=2", "data.calibration.seqlen=64", "prune.granularity=matrix")
    calls = []
    report = run_prune(config, tmp_path / "out", progress=lambda done, total, msg: calls.append((done, total)))
    assert report["calibration"]["windows"] == 2 and report["calibration"]["seqlen"] == 64
    assert calls[0] == (0, 2) and calls[-1] == (2, 2)


def test_true_sequential_bf16_run_is_exact_in_pattern(tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir, "prune.method=sparsegpt", "prune.pattern=4:8", "prune.blocksize=32",
                     "prune.sequential=linear", "prune.compute_dtype=bfloat16", "prune.error_tokens=64")
    report = run_prune(config, tmp_path / "out", calib=_calib())
    assert report["engine"]["sequential"] == "linear" and report["engine"]["compute_dtype"] == "bfloat16"
    recorded = report["config"]["prune"]
    assert (recorded["sequential"], recorded["compute_dtype"], recorded["error_tokens"]) == ("linear", "bfloat16", 64)
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    for name, kept in load_masks(tmp_path / "out").items():
        assert (kept.view(kept.shape[0], -1, 8).sum(-1) == 4).all(), name
    with pytest.raises(ConfigError, match="prune.sequential"):
        run_prune(config, tmp_path / "bad", calib=_calib(), sequential="diagonal")


class _EngineReached(Exception):
    pass


@pytest.fixture
def engine_options(monkeypatch):
    """The EngineOptions `run_prune` hands the engine (which is then stopped before it does any work)."""
    seen = []

    def capture(model, family, method, plans, ids, options, progress=None):
        seen.append(options)
        raise _EngineReached

    monkeypatch.setattr("perp.prune.run.prune_model", capture)
    return seen


def test_engine_settings_come_from_the_config(engine_options, tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir, "prune.compute_dtype=bfloat16", "prune.batch_size=3", "prune.error_tokens=7",
                     "prune.sequential=linear")
    with pytest.raises(_EngineReached):
        run_prune(config, tmp_path / "out", calib=_calib())
    options = engine_options[-1]
    assert (options.compute_dtype, options.batch_size, options.error_tokens, options.sequential) == \
        (torch.bfloat16, 3, 7, "linear")

    # defaults: the weights' dtype, automatic micro-batches, 512 error tokens, the reference mode
    with pytest.raises(_EngineReached):
        run_prune(_config(tiny_llama_dir), tmp_path / "out", calib=_calib())
    options = engine_options[-1]
    assert (options.compute_dtype, options.error_tokens, options.sequential) == (None, 512, "layer")
    assert options.batch_size == 4096 // 32  # default_batch_size on CPU for 32-token windows


def test_keyword_options_override_the_config(engine_options, tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir, "prune.compute_dtype=bfloat16", "prune.batch_size=3", "prune.error_tokens=7",
                     "prune.sequential=linear")
    with pytest.raises(_EngineReached):
        run_prune(config, tmp_path / "out", calib=_calib(), sequential="layer", error_tokens=0)
    options = engine_options[-1]
    assert (options.compute_dtype, options.batch_size, options.error_tokens, options.sequential) == \
        (torch.bfloat16, 3, 0, "layer")
    with pytest.raises(ConfigError, match="prune.batch_size: must be > 0"):
        run_prune(config, tmp_path / "out", calib=_calib(), batch_size=-2)


def test_cli_flags_override_params_yaml(engine_options, tiny_llama_dir, tmp_path, monkeypatch):
    from perp.cli import main

    (tmp_path / "params.yaml").write_text(
        f"model: {{name: {tiny_llama_dir}, device: cpu}}\n"
        "data: {calibration: {source: calib.txt, nsamples: 2, seqlen: 32}}\n"
        "prune: {compute_dtype: bfloat16, batch_size: 3, error_tokens: 7, sequential: linear}\n")
    (tmp_path / "calib.txt").write_text(" ".join(f"token{i}" for i in range(300)))
    monkeypatch.chdir(tmp_path)
    argv = ["perp", "prune", "--out", str(tmp_path / "out"), "--json"]
    for extra, expected in [
        ([], (torch.bfloat16, 3, 7, "linear")),
        (["--compute-dtype", "float32", "--batch-size", "1", "--error-tokens", "0", "--sequential", "layer"],
         (torch.float32, 1, 0, "layer")),
    ]:
        monkeypatch.setattr("sys.argv", argv + extra)
        with pytest.raises(_EngineReached):
            main()
        options = engine_options[-1]
        assert (options.compute_dtype, options.batch_size, options.error_tokens, options.sequential) == expected


def test_engine_settings_key_the_mask_stage(monkeypatch, tmp_path):
    """The pipeline keys the mask stage on the whole prune section, so a changed engine setting is a new output."""
    from perp import pipeline
    from perp.config import PerpConfig

    seen = []
    monkeypatch.setattr("perp.prune.run_prune",
                        lambda config, out, **kwargs: seen.append((Path(out).name, config.prune.sequential)))
    monkeypatch.setattr("perp.data.calibrate.load_token_set", lambda path: None)
    monkeypatch.setattr(pipeline, "require", lambda ref, what: tmp_path)
    monkeypatch.setattr(pipeline, "reference", lambda path, **extra: {"uri": str(path)})
    defaults = PerpConfig().model_dump(mode="json")
    model = {**defaults["model"], "name": "tiny-llama"}
    calibration = {"uri": str(tmp_path), "sha256": "0" * 64}
    for prune in (defaults["prune"], {**defaults["prune"], "sequential": "linear"},
                  {**defaults["prune"], "batch_size": 2}, defaults["prune"]):
        pipeline.mask_stage(model, prune, calibration, tmp_path / "work")
    assert [mode for _, mode in seen] == ["layer", "linear", "layer", "layer"]
    names = [name for name, _ in seen]
    assert len(set(names[:3])) == 3 and names[3] == names[0]


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_engine(monkeypatch):
    """Bad input must fail before the first layer: the engine must never be reached."""
    def fail(*args, **kwargs):
        raise AssertionError("the engine ran on bad input")

    monkeypatch.setattr("perp.prune.run.prune_model", fail)


def _expect(error_type, needles, config, out, calib=None):
    with pytest.raises(error_type) as info:
        run_prune(config, out, calib=calib)
    message = str(info.value)
    assert isinstance(info.value, PerpError) and "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()


def test_model_without_decoder_layers(no_engine, tmp_path):
    from transformers import LlamaForCausalLM

    from perp.models.tiny import byte_tokenizer, tiny_config

    directory = tmp_path / "empty"
    LlamaForCausalLM(tiny_config("llama", layers=0)).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    _expect(UnsupportedArchitectureError, ["no recognised decoder layers", "model.layers"],
            _config(directory), tmp_path / "out", _calib())


def test_mixture_of_experts_model_is_refused(no_engine, tmp_path):
    """transformers keeps Mixtral's experts as fused 3-D tensors: pruning the Linears alone would report the
    target sparsity over attention while ~90% of the weights stayed dense."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from perp.models.tiny import byte_tokenizer

    directory = tmp_path / "moe"
    MixtralForCausalLM(MixtralConfig(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1)).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    _expect(UnsupportedArchitectureError, ["'mixtral' (MixtralForCausalLM) is a mixture-of-experts model",
                                           "would stay dense"], _config(directory), tmp_path / "out", _calib())


def test_weight_matrices_outside_linears_are_refused_when_planning():
    from perp.models.families import LLAMA
    from perp.models.tiny import build_tiny_model
    from perp.prune import PruneSpec, plan_pruning

    model = build_tiny_model("llama")
    spec = PruneSpec(sparsity=0.5)
    assert plan_pruning(model, LLAMA, ["*"], [], spec)  # the stock layers hold Linears only
    model.model.layers[1].mlp.register_parameter("experts", torch.nn.Parameter(torch.zeros(2, 8, 8)))
    outside = r"decoder layer 1 holds weight matrices outside nn\.Linear \(model\.layers\.1\.mlp\.experts\)"
    with pytest.raises(UnsupportedArchitectureError, match=outside):
        plan_pruning(model, LLAMA, ["*"], [], spec)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_activations_that_overflow_are_an_error_not_a_silent_underprune(tmp_path, method):
    """fp16 forwards of a layer with large MLP weights reach inf: Wanda's NaN scores selected nothing (achieved
    sparsity 0.31 of 0.5, exit 0) and SparseGPT blamed the calibration text."""
    from perp.errors import PruneNumericsError
    from perp.models.tiny import build_tiny_model, byte_tokenizer

    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3000.0)
        model.model.layers[0].mlp.down_proj.weight.mul_(3000.0)
    directory = tmp_path / "hot"
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    config = _config(directory, f"prune.method={method}")
    with pytest.raises(PruneNumericsError, match=r"model\.layers\.1\.\S+: its calibration inputs are not finite"):
        run_prune(config, tmp_path / "out", calib=_calib(), compute_dtype="float16")
    assert not (tmp_path / "out").exists()
    assert run_prune(config, tmp_path / "out", calib=_calib())["achieved_sparsity"] == 0.5  # fine in fp32


def test_report_is_standard_json_when_errors_are_not_estimated(tiny_llama_dir, tmp_path):
    """`error_tokens: 0` leaves every reconstruction error unknown: null in the report, not Python's bare NaN,
    which strict JSON parsers (JavaScript, Go, serde) reject."""
    def strict(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    out = tmp_path / "out"
    run_prune(_config(tiny_llama_dir, "prune.method=wanda"), out, calib=_calib(), error_tokens=0)
    report = json.loads((out / REPORT_FILE).read_text(), parse_constant=strict)
    assert report["mean_rel_error"] is None
    assert all(entry["rel_error"] is None for entry in report["layers"].values())


@pytest.mark.parametrize("weights, compute, needle", [
    ("bfloat16", "float32", "autocast only lowers precision, so the forwards would run in bfloat16"),
    ("float16", "bfloat16", "autocast from one half type to the other fails in the norms"),
    ("bfloat16", "float16", "autocast from one half type to the other fails in the norms"),
])
def test_compute_dtype_autocast_cannot_honour_fails_before_loading(no_engine, model_loads, tiny_opt_dir, tmp_path,
                                                                   weights, compute, needle):
    _expect(ConfigError, [f"prune.compute_dtype={compute} with {weights} weights", needle],
            _config(tiny_opt_dir, f"model.dtype={weights}", f"prune.compute_dtype={compute}"), tmp_path / "out",
            _calib())
    assert model_loads == []


def test_calibration_ids_that_are_not_integers(no_engine, tiny_llama_dir, tmp_path):
    floats = TokenSet(torch.rand(2, 16) * 200, "test:floats")
    _expect(DataSourceError, ["must be integer token ids", "torch.float32"], _config(tiny_llama_dir), tmp_path / "out",
            floats)


@pytest.mark.parametrize("sequential, batch, definition", [("linear", 4, "as the one-pass forward reached it"),
                                                           ("layer", 2, "in the dense layer")])
def test_report_records_the_engine_as_it_ran(tiny_llama_dir, tmp_path, sequential, batch, definition):
    """One-pass mode streams every window at once, whatever `prune.batch_size` says, and its errors are measured on
    inputs that the layer's earlier groups already saw pruned."""
    report = run_prune(_config(tiny_llama_dir, "prune.method=wanda"), tmp_path / "out", calib=_calib(windows=4),
                       batch_size=2, sequential=sequential)
    assert report["engine"]["sequential"] == sequential and report["engine"]["batch_size"] == batch
    assert definition in report["rel_error_estimate"]["definition"]


def test_calibration_text_shorter_than_one_window(no_engine, tiny_llama_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("far too short")
    config = _config(tiny_llama_dir, f"data.calibration.source={text}", "data.calibration.seqlen=512")
    _expect(DataSourceError, ["shorter than one window of 512"], config, tmp_path / "out")


def test_sparsity_that_prunes_nothing(no_engine, tiny_llama_dir, tmp_path):
    _expect(ConfigError, ["prune.sparsity: 0.01 prunes no weight of model.layers.0.self_attn.q_proj", "64 inputs"],
            _config(tiny_llama_dir, "prune.sparsity=0.01"), tmp_path / "out", _calib())
    _expect(ConfigError, ["prune.sparsity: 0 prunes no weight"],
            _config(tiny_llama_dir, "prune.sparsity=0.0", "prune.granularity=matrix"), tmp_path / "out", _calib())


def test_nm_pattern_on_indivisible_inputs(no_engine, tiny_llama_dir, tmp_path):
    _expect(ConfigError, ["prune.pattern: 3:7", "divisible by 7", "model.layers.0.self_attn.q_proj has 64 inputs"],
            _config(tiny_llama_dir, "prune.pattern=3:7"), tmp_path / "out", _calib())


def test_selection_that_matches_nothing_and_foreign_tokens(no_engine, tiny_llama_dir, tmp_path):
    _expect(ConfigError, ["select no decoder Linear", "model.layers.0.self_attn.q_proj"],
            _config(tiny_llama_dir, "prune.include=['lm_head']"), tmp_path / "out", _calib())
    foreign = TokenSet(torch.full((2, 16), 50_000), "test:foreign")
    _expect(DataSourceError, ["vocabulary has 259 entries"], _config(tiny_llama_dir), tmp_path / "out", foreign)


def test_unknown_compute_dtype_fails_before_loading(no_engine, tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="prune.compute_dtype"):
        run_prune(_config(tiny_llama_dir), tmp_path / "out", calib=_calib(), compute_dtype="int8")


def test_a_disk_too_small_for_the_checkpoint_fails_before_loading(no_engine, tiny_llama_dir, tmp_path, full_disk,
                                                                   monkeypatch):
    import perp.models

    monkeypatch.setattr(perp.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    disk = full_disk(tmp_path / "disk", free=1 << 20)
    _expect(OutputError, ["the pruned checkpoint with its masks needs about", "1.0 MiB free"], _config(tiny_llama_dir),
            disk / "out", _calib())


@pytest.mark.parametrize("content, why", [
    (b"\x10\x00", "2 bytes, shorter than a safetensors header"),  # a truncated download
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "header length field says"),  # no LFS
    (len(b'{"w": {"dtype": "F32"}}').to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}', "'data_offsets'"),
])
def test_a_damaged_checkpoint_fails_in_one_line_before_loading(no_engine, tiny_llama_dir, tmp_path, content, why):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama_dir, damaged)
    (damaged / "model.safetensors").write_bytes(content)
    _expect(ModelSourceError, ["model.safetensors' is not a readable safetensors file", why, "git-lfs pointer"],
            _config(damaged), tmp_path / "out", _calib())


def test_the_space_estimate_is_what_a_prune_writes(tiny_llama_dir, tmp_path):
    from perp.models.loading import saved_copy_bytes

    run_prune(_config(tiny_llama_dir), tmp_path / "out", calib=_calib())
    written = sum(path.stat().st_size for path in (tmp_path / "out").glob("model*.safetensors"))
    estimate = saved_copy_bytes(str(tiny_llama_dir), device="cpu")
    assert estimate <= written < estimate + 16 * 1024  # the difference is the safetensors header


# --------------------------------------------------------------------------------------------- CLI


def test_cli_prune_json(cli, tiny_llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i}" for i in range(300)))
    out = tmp_path / "pruned"
    result = cli("prune", "--model", str(tiny_llama_dir), "--calib", str(text), "--method", "sparsegpt",
                 "--pattern", "2:4", "--nsamples", "2", "--seqlen", "64", "--out", str(out), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["achieved_sparsity"] == pytest.approx(0.5) and payload["out"] == str(out)
    assert payload["report"]["pattern"] == "2:4" and (out / MASKS_FILE).is_file()


_TERMINATED_WHILE_SAVING = """
import os, signal, sys
import perp.prune.run as run

real = run.save_masks

def save_then_terminate(*args, **kwargs):  # SIGTERM arrives with the output half-written in its staging
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)

run.save_masks = save_then_terminate
from perp.cli import main
sys.argv = ["perp", *sys.argv[1:]]
main()
"""


def test_sigterm_while_saving_exits_143_and_leaves_no_staging(tiny_llama_dir, tmp_path):
    """`docker stop`, an evicted pod or a cancelled DVC/Prefect run: the half-written output is removed."""
    import subprocess
    import sys

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i}" for i in range(300)))
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-c", _TERMINATED_WHILE_SAVING, "prune", "--model", str(tiny_llama_dir),
                             "--calib", str(text), "--nsamples", "2", "--seqlen", "64", "--out", str(runs / "pruned")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert list(runs.iterdir()) == []  # neither the output nor its staging


def test_cli_bad_input_is_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from perp.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i}" for i in range(300)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["perp", "prune", "--model", str(tiny_llama_dir), "--calib", str(text),
                                     "--sparsity", "0.01", "--seqlen", "64", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: prune.sparsity: 0.01 prunes no weight"), lines
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------- sparsity gate


def _evaluate(config, model_dir: Path, out: Path, dense: Path) -> dict:
    from perp.evaluate import stage

    return stage.run_evaluate(config, str(model_dir), out, dense=str(dense))


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("sparsity", [0.6, 0.3])
def test_sparsity_gate_compares_achieved_with_planned(family, sparsity, tiny_llama_dir, tiny_opt_dir, tmp_path,
                                                      monkeypatch):
    """Per-row rounding keeps the achieved sparsity off the nominal one (floor(0.6 × 64) / 64 = 0.59375): the plan
    knows the exact count, the report records it, and the gate compares with it; un-zeroed weights still fail."""
    import shutil

    from transformers import AutoModelForCausalLM

    from perp.evaluate import stage
    from perp.registry.gates import evaluate_gates

    monkeypatch.setattr(stage, "cache_dir", lambda *parts: tmp_path / "baselines")
    dense = tiny_llama_dir if family == "llama" else tiny_opt_dir
    config = _config(dense, "prune.method=wanda", f"prune.sparsity={sparsity}", "evaluate.batch_size=1",
                     "evaluate.perplexity=[{name: wiki, source: 'embedded:wiki-eval', seqlen: 32, max_windows: 1}]")
    pruned = tmp_path / "pruned"
    report = run_prune(config, pruned, calib=_calib())

    # the plan, not the result: every Linear's floor(sparsity × in_features) per row, over the planned weights
    from perp.models.families import adapter_for

    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    expected = sum(linear.weight.shape[0] * int(sparsity * linear.weight.shape[1])
                   for _, linear in adapter_for(model).named_decoder_linears(model))
    assert report["planned_pruned_weights"] == expected == report["pruned_weights"]
    assert report["planned_sparsity"] == pytest.approx(expected / report["selected_weights"], abs=0)
    assert report["planned_sparsity"] == report["achieved_sparsity"] < sparsity - 5e-4  # the nominal gate failed

    gates = {"max_ppl_ratio": None, "max_zeroshot_drop": None, "min_sparsity": None}
    metrics = _evaluate(config, pruned, tmp_path / "pruned.json", dense)
    assert metrics["target_sparsity"] == sparsity and metrics["model"]["planned_sparsity_from"] == "prune_report"
    assert metrics["planned_sparsity"] == pytest.approx(report["planned_sparsity"])  # every decoder Linear pruned
    result = evaluate_gates("dev", ["dev"], gates, metrics, set())
    assert result["passed"], result

    # a copy without prune_report.json (as a recovered model is evaluated): the plan of the config's prune section
    bare = tmp_path / "bare"
    shutil.copytree(pruned, bare)
    (bare / REPORT_FILE).unlink()
    metrics = _evaluate(config, bare, tmp_path / "bare.json", dense)
    assert metrics["model"]["planned_sparsity_from"] == "config"
    assert metrics["planned_sparsity"] == pytest.approx(report["planned_sparsity"])
    assert evaluate_gates("dev", ["dev"], gates, metrics, set())["passed"]

    # un-zero a handful of pruned weights of one Linear: the checkpoint no longer holds the plan, the gate fails
    name, kept = next(iter(load_masks(pruned).items()))
    linear = model.get_submodule(name)
    with torch.no_grad():
        rows, cols = torch.nonzero(~kept, as_tuple=True)
        linear.weight[rows[:4], cols[:4]] = 0.01
    unzeroed = tmp_path / "unzeroed"
    model.save_pretrained(unzeroed)
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", REPORT_FILE):
        if (pruned / extra).is_file():
            shutil.copy(pruned / extra, unzeroed / extra)
    metrics = _evaluate(config, unzeroed, tmp_path / "unzeroed.json", dense)
    result = evaluate_gates("dev", ["dev"], gates, metrics, set())
    assert result["failed"] == ["sparsity"], result
    assert "below the minimum" in result["checks"][0]["detail"]


def test_owl_run_reports_layer_sparsities_and_an_exact_plan(tied_llama_dir, tmp_path):
    config = _config(tied_llama_dir, "prune.method=sparsegpt", "prune.blocksize=32", "prune.sparsity=0.5",
                     "prune.owl_lambda=0.1", "prune.owl_m=2")
    report = run_prune(config, tmp_path / "owl", calib=_calib())
    owl = report["owl"]
    assert owl["lambda"] == 0.1 and set(owl["layer_sparsity"]) == set(owl["outlier_ratios"]) == {"0", "1"}
    assert len(set(owl["layer_sparsity"].values())) == 2
    assert report["planned_pruned_weights"] == report["pruned_weights"]  # the sparsity gate's exact count
    for name, entry in report["layers"].items():
        layer = name.split(".")[2]
        cols = entry["shape"][1]
        assert entry["sparsity"] == pytest.approx(pruned_per(cols, owl["layer_sparsity"][layer]) / cols)
    assert "owl" in report["timings"]


@pytest.mark.parametrize("sets, match", [
    (["prune.pattern=2:4", "prune.owl_lambda=0.05"], "N:M pattern"),
    (["prune.sparsity=0.5", "prune.owl_lambda=0.3"], "inside \\(0, 1\\)"),
    (["prune.owl_lambda=-0.1"], "must be >= 0"),
    (["prune.owl_lambda=0.05", "prune.owl_m=0"], "owl_m"),
])
def test_owl_settings_that_cannot_work_fail_before_loading(sets, match):
    with pytest.raises(ConfigError, match=match):
        _config("tiny-llama", *sets)


def test_owl_lambda_that_empties_a_linear_fails_before_the_model_loads(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("perp.models.load_model", no_load)
    config = _config("tiny-llama", "prune.sparsity=0.05", "prune.owl_lambda=0.024")
    with pytest.raises(ConfigError, match="prune.owl_lambda"):
        run_prune(config, Path("/nonexistent/never-written"), calib=_calib())
