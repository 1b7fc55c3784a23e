"""What `perp evaluate` and `perp eval ppl` compare and refuse: window lengths against the models' positions, a
diverged model's perplexity, the dense baseline a candidate is held to, and the sparsity it is gated against."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from perp.config import load_params
from perp.data.windows import TokenSet
from perp.errors import ConfigError, PerpError
from perp.evaluate import stage
from perp.evaluate.perplexity import perplexity, ppl_from_nll
from perp.evaluate.stage import EvaluateError

TEXT = "embedded:wiki-eval"
PRUNED_SPARSITY = 0.7  # what the chain below prunes; params.yaml's prune.sparsity says 0.5


def _config(model: str | Path, *sets: str):
    return load_params(None, [
        f"model.name={model}", "model.device=cpu", "evaluate.batch_size=2", "prune.sparsity=0.5",
        f"evaluate.perplexity=[{{name: w, source: '{TEXT}', seqlen: 32, max_windows: 2}}]", *sets,
    ])


def _long_windows(seqlen: int = 4096) -> str:
    return f"evaluate.perplexity=[{{name: w, source: '{TEXT}', seqlen: {seqlen}, max_windows: 1}}]"


@pytest.fixture(autouse=True)
def baselines(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "cache_dir", lambda *parts: tmp_path / "baselines")


@pytest.fixture
def loads(model_loads) -> list[str]:
    return model_loads


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """dense tiny LLaMA → pruned at 70% (prune_report.json) → recovered (recover_report.json, no prune report)."""
    from perp.models.tiny import save_tiny_model
    from perp.prune.run import run_prune
    from perp.recover.run import run_recover

    root = tmp_path_factory.mktemp("chain")
    dense = save_tiny_model(root / "dense", "llama")
    ids = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    config = load_params(None, [f"model.name={dense}", "model.device=cpu", "prune.method=wanda",
                                f"prune.sparsity={PRUNED_SPARSITY}"])
    run_prune(config, root / "pruned", calib=TokenSet(ids, "test:random", {"seed": 0}))
    recover = load_params(None, [
        "model.device=cpu", "recover.method=norm", "recover.steps=2", "recover.seqlen=32", "recover.batch_size=2",
        "recover.lr=0.01", "data.calibration.source=embedded:wiki-calib", "data.calibration.nsamples=4",
        "data.evaluation.source=embedded:wiki-eval", "data.evaluation.seqlen=32", "data.evaluation.max_windows=1",
        "evaluate.batch_size=2",
    ])
    run_recover(recover, str(root / "pruned"), root / "recovered")
    assert not (root / "recovered" / "prune_report.json").exists()
    return {"dense": dense, "pruned": root / "pruned", "recovered": root / "recovered"}


# --------------------------------------------------------------------------------------------- window lengths


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_eval_ppl_refuses_windows_longer_than_the_model(family, tiny_llama_dir, tiny_opt_dir, tmp_path, cli):
    """OPT failed with an IndexError traceback; LLaMA (RoPE) silently scored positions it never learned."""
    model = tiny_opt_dir if family == "opt" else tiny_llama_dir
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    result = cli("eval", "ppl", "--model", str(model), "--data", str(text), "--seqlen", "4096", "--windows", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (f"data.evaluation.seqlen (--seqlen): perplexity windows of 4096 tokens exceed the 2048 positions of "
            f"'{model}'; use at most 2048") in result.stderr


def test_evaluate_refuses_windows_longer_than_the_candidate_before_loading(tiny_opt_dir, loads, tmp_path):
    config = _config(tiny_opt_dir, _long_windows())
    with pytest.raises(ConfigError, match=r"^evaluate\.perplexity\.0\.seqlen \(text 'w'\): perplexity windows of "
                                          r"4096 tokens exceed the 2048 positions of '.*tiny-opt.*'; use at most "
                                          r"2048$"):
        stage.run_evaluate(config, str(tiny_opt_dir), tmp_path / "metrics.json")
    assert loads == [] and not (tmp_path / "metrics.json").exists()
    # the longest window that fits still evaluates
    metrics = stage.run_evaluate(_config(tiny_opt_dir, _long_windows(2048)), str(tiny_opt_dir), tmp_path)
    assert metrics["perplexity"]["w"]["seqlen"] == 2048 and math.isfinite(metrics["perplexity"]["w"]["ppl"])


def test_perp_evaluate_refuses_windows_longer_than_the_model_in_one_line(tiny_opt_dir, tmp_path, cli):
    result = cli("evaluate", "--model", str(tiny_opt_dir), "-S", f"model.name={tiny_opt_dir}", "-S", _long_windows(),
                 "--out", str(tmp_path / "metrics.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("evaluate.perplexity.0.seqlen (text 'w'): perplexity windows of 4096 tokens exceed the 2048 positions"
            in result.stderr)
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_refuses_windows_longer_than_the_dense_model(tiny_llama_dir, loads, tmp_path):
    longer = _copy(tiny_llama_dir, tmp_path / "longer")
    _edit_json(longer / "config.json", max_position_embeddings=8192)
    config = _config(tiny_llama_dir, _long_windows())
    with pytest.raises(ConfigError, match=r"4096 tokens exceed the 2048 positions of the dense model '.*'"):
        stage.run_evaluate(config, str(longer), tmp_path / "metrics.json", dense=str(tiny_llama_dir))
    assert loads == []


def test_perplexity_itself_refuses_windows_longer_than_the_model():
    from perp.models.tiny import build_tiny_model

    model = build_tiny_model("opt")
    windows = TokenSet(torch.full((1, 2051), 5), "test:long", {})
    with pytest.raises(ConfigError, match="2051 tokens exceed the 2048 positions of the model"):
        perplexity(model, windows)


# --------------------------------------------------------------------------------------------- diverged models


def test_ppl_from_nll_overflows_to_inf_and_keeps_nan():
    assert ppl_from_nll(math.log(20.0)) == pytest.approx(20.0)
    assert ppl_from_nll(710.0) == math.inf  # math.exp(710) raises OverflowError
    assert math.isnan(ppl_from_nll(math.nan))


def _diverged(directory: Path, tiny_llama_dir: Path, value: float | None) -> Path:
    """tiny LLaMA with its LM head scaled ×1e5 (NLL in the thousands) or filled with `value` (NaN)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(1e5) if value is None else head.fill_(value)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, directory / name)
    return directory


def test_diverged_model_has_infinite_perplexity_not_a_traceback(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from perp.data import evaluation_set
    from perp.models.loading import load_tokenizer
    from perp.registry.gates import evaluate_gates

    diverged = _diverged(tmp_path / "diverged", tiny_llama_dir, None)
    windows = evaluation_set(_config(tiny_llama_dir).evaluate.perplexity[0], load_tokenizer(str(tiny_llama_dir)))
    result = perplexity(AutoModelForCausalLM.from_pretrained(diverged, dtype=torch.float32), windows)
    assert result.nll > 710 and math.isfinite(result.nll) and result.ppl == math.inf

    metrics = stage.run_evaluate(_config(tiny_llama_dir), str(diverged), tmp_path / "out")
    entry = metrics["perplexity"]["w"]
    assert entry["ppl"] == math.inf and entry["ratio"] == math.inf and math.isfinite(entry["dense_ppl"])
    assert metrics["gates"]["ppl_ratio"] == math.inf
    gates = {"max_ppl_ratio": 1.5, "max_zeroshot_drop": None, "min_sparsity": None}
    assert not evaluate_gates("dev", ["dev"], gates, metrics, set())["passed"]

    def strict(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    # The file is standard JSON: the infinite figures are null (a gate fails closed on them), the NLL says why.
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=strict)
    assert written["gates"]["ppl_ratio"] is None and written["perplexity"]["w"]["ppl"] is None
    assert written["perplexity"]["w"]["nll"] == pytest.approx(result.nll)
    assert not evaluate_gates("dev", ["dev"], gates, written, set())["passed"]


def test_nan_logits_give_nan_perplexity_and_the_worst_ratio(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from perp.data import evaluation_set
    from perp.models.loading import load_tokenizer

    broken = _diverged(tmp_path / "nan", tiny_llama_dir, math.nan)
    windows = evaluation_set(_config(tiny_llama_dir).evaluate.perplexity[0], load_tokenizer(str(tiny_llama_dir)))
    result = perplexity(AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32), windows)
    assert math.isnan(result.nll) and math.isnan(result.ppl)
    # max() would skip a NaN text after a finite one and pass the gate: the worst ratio is NaN
    assert math.isnan(stage._worst_ratio([1.1, math.nan])) and math.isnan(stage._worst_ratio([math.nan, 1.1]))
    assert stage._worst_ratio([1.1, 1.3]) == 1.3 and stage._worst_ratio([]) is None


# --------------------------------------------------------------------------------------------- the dense baseline


def test_default_dense_is_the_base_model_the_recovered_candidate_records(chain, tiny_opt_dir, loads, tmp_path):
    """params.yaml's model.name is another model (here tiny OPT; by default SmolLM2): the recovered model is
    compared with the model it was pruned from, found through recover_report.json → the input's prune_report."""
    from perp.registry.gates import evaluate_gates

    metrics = stage.run_evaluate(_config(tiny_opt_dir), str(chain["recovered"]), tmp_path / "metrics.json")
    assert loads == [str(chain["recovered"]), str(chain["dense"])]
    assert metrics["model"]["dense_source"] == str(chain["dense"]) and metrics["model"]["dense_from"] == "prune_report"
    from perp.models.loading import model_content_hash

    assert metrics["model"]["dense_sha256"] == model_content_hash(chain["dense"])
    # the 70% plan of the model, not params.yaml's 50%
    report = json.loads((chain["pruned"] / "prune_report.json").read_text())
    assert metrics["target_sparsity"] == PRUNED_SPARSITY
    assert metrics["model"]["target_sparsity_from"] in ("recover_report", "prune_report")
    assert metrics["planned_pruned_weights"] == report["planned_pruned_weights"]
    assert metrics["model"]["planned_sparsity_from"] == metrics["model"]["target_sparsity_from"]
    assert metrics["sparsity"] == pytest.approx(report["planned_sparsity"], abs=1e-6)
    gates = {"max_ppl_ratio": None, "max_zeroshot_drop": None, "min_sparsity": None}
    assert evaluate_gates("dev", ["dev"], gates, metrics, set())["passed"]


def test_pruned_candidate_defaults_to_its_base_model(chain, tiny_opt_dir, loads, tmp_path):
    metrics = stage.run_evaluate(_config(tiny_opt_dir), str(chain["pruned"]), tmp_path / "metrics.json")
    assert loads == [str(chain["pruned"]), str(chain["dense"])]
    assert metrics["model"]["dense_source"] == str(chain["dense"])
    assert metrics["target_sparsity"] == PRUNED_SPARSITY and metrics["model"]["target_sparsity_from"] == "prune_report"


def test_dense_of_another_architecture_is_refused_before_loading(chain, tiny_opt_dir, loads, tmp_path):
    from perp.store.testing import pruned_tiny_checkpoint

    bare = pruned_tiny_checkpoint(tmp_path / "bare")  # no reports: the default is model.name
    with pytest.raises(EvaluateError, match=r"dense baseline '.*' \(from model.name\) is not the architecture of "
                                            r"'.*bare' \(candidate vs dense: model_type llama vs opt\); pass the "
                                            "dense model it was pruned from with --dense"):
        stage.run_evaluate(_config(tiny_opt_dir), str(bare), tmp_path / "metrics.json")
    with pytest.raises(EvaluateError, match=r"\(from --dense\) is not the architecture"):
        stage.run_evaluate(_config(chain["dense"]), str(chain["recovered"]), tmp_path / "m.json",
                           dense=str(tiny_opt_dir))
    wider = _copy(chain["dense"], tmp_path / "wider")
    _edit_json(wider / "config.json", num_hidden_layers=3, vocab_size=300)
    with pytest.raises(EvaluateError, match=r"num_hidden_layers 2 vs 3, vocab_size 259 vs 300"):
        stage.run_evaluate(_config(chain["dense"]), str(chain["recovered"]), tmp_path / "m.json", dense=str(wider))
    assert loads == [] and not (tmp_path / "metrics.json").exists()


def test_recorded_base_model_that_is_gone_or_changed_is_an_error(chain, tmp_path, loads):
    pruned = _copy(chain["pruned"], tmp_path / "pruned")
    report = json.loads((pruned / "prune_report.json").read_text())
    config = _config(chain["dense"])

    _edit_json(pruned / "prune_report.json", base_model={**report["base_model"], "source": str(tmp_path / "gone")})
    with pytest.raises(EvaluateError, match=r"prune_report.json names the dense model '.*gone' the candidate was "
                                            r"pruned from, which is not usable here .*; pass the dense model with "
                                            "--dense"):
        stage.run_evaluate(config, str(pruned), tmp_path / "metrics.json")

    _edit_json(pruned / "prune_report.json", base_model={**report["base_model"], "sha256": "0" * 64})
    with pytest.raises(EvaluateError, match=r"with sha256 000000000000, but '.*' now has sha256 [0-9a-f]{12}; pass"):
        stage.run_evaluate(config, str(pruned), tmp_path / "metrics.json")
    assert loads == []
    # --dense overrides what the report records
    metrics = stage.run_evaluate(config, str(pruned), tmp_path / "metrics.json", dense=str(chain["dense"]))
    assert metrics["model"]["dense_from"] == "--dense" and metrics["target_sparsity"] == PRUNED_SPARSITY


# --------------------------------------------------------------------------------------------- target sparsity


def test_recover_report_pruning_section_gives_the_target(chain, tmp_path):
    """A recovered model whose input is gone: recover_report.json's `pruning` section still says 70%."""
    pruned_report = json.loads((chain["pruned"] / "prune_report.json").read_text())
    recovered = _copy(chain["recovered"], tmp_path / "recovered")
    pruning = {key: pruned_report[key] for key in ("target_sparsity", "planned_sparsity", "planned_pruned_weights")}
    _edit_json(recovered / "recover_report.json", model=str(tmp_path / "gone"), pruning=pruning)
    metrics = stage.run_evaluate(_config(chain["dense"]), str(recovered), tmp_path / "metrics.json")
    assert metrics["target_sparsity"] == PRUNED_SPARSITY
    assert metrics["model"]["target_sparsity_from"] == metrics["model"]["planned_sparsity_from"] == "recover_report"
    assert metrics["planned_pruned_weights"] == pruned_report["planned_pruned_weights"]
    assert metrics["model"]["pruning_record"] == str(recovered / "recover_report.json")


def test_without_any_pruning_record_the_target_comes_from_params(chain, tmp_path):
    recovered = _copy(chain["recovered"], tmp_path / "recovered")
    report = json.loads((recovered / "recover_report.json").read_text())
    report.pop("pruning", None)
    report["model"] = str(tmp_path / "gone")
    (recovered / "recover_report.json").write_text(json.dumps(report))
    metrics = stage.run_evaluate(_config(chain["dense"]), str(recovered), tmp_path / "metrics.json")
    assert metrics["target_sparsity"] == 0.5 and metrics["model"]["target_sparsity_from"] == "config"
    assert metrics["model"]["pruning_record"] is None


def test_an_input_that_changed_since_recovery_is_not_trusted(chain, tmp_path):
    pruned = _copy(chain["pruned"], tmp_path / "pruned")
    _edit_json(pruned / "prune_report.json", target_sparsity=0.9)  # another prune run overwrote the input
    recovered = _copy(chain["recovered"], tmp_path / "recovered")
    report = json.loads((recovered / "recover_report.json").read_text())
    report.pop("pruning", None)
    report["model"] = str(pruned)
    (recovered / "recover_report.json").write_text(json.dumps(report))
    lines: list[str] = []
    metrics = stage.run_evaluate(_config(chain["dense"]), str(recovered), tmp_path / "metrics.json",
                                 log=lines.append)
    assert metrics["target_sparsity"] == 0.5 and metrics["model"]["target_sparsity_from"] == "config"
    assert any("changed since it was recovered from" in line for line in lines)


def test_iterative_pruning_defaults_to_the_original_dense_model(chain, tiny_opt_dir, loads, tmp_path):
    """dense → pruned 70% → recovered → pruned again (80%): the baseline is the dense model, not an intermediate."""
    from perp.prune.run import run_prune

    ids = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(1))
    config = load_params(None, [f"model.name={chain['recovered']}", "model.device=cpu", "prune.method=wanda",
                                "prune.sparsity=0.8"])
    run_prune(config, tmp_path / "again", calib=TokenSet(ids, "test:random", {"seed": 1}))
    loads.clear()
    metrics = stage.run_evaluate(_config(tiny_opt_dir), str(tmp_path / "again"), tmp_path / "metrics.json")
    assert metrics["model"]["dense_source"] == str(chain["dense"])
    assert metrics["target_sparsity"] == 0.8  # the nearest pruning record


def test_recovered_candidate_keeps_its_recorded_base_when_its_input_is_gone(chain, tiny_opt_dir, loads, tmp_path):
    """The pruned input moved away: the base model recover_report.json copied from its prune report still names
    the baseline (not model.name), and is still checked against its recorded sha256."""
    moved = _copy(chain["recovered"], tmp_path / "recovered")
    _edit_json(moved / "recover_report.json", model=str(tmp_path / "gone"))
    metrics = stage.run_evaluate(_config(tiny_opt_dir), str(moved), tmp_path / "metrics.json")
    assert metrics["model"]["dense_source"] == str(chain["dense"])
    assert metrics["model"]["dense_from"] == "recover_report"
    changed = _copy(chain["dense"], tmp_path / "dense-changed")
    report = json.loads((moved / "recover_report.json").read_text())
    report["pruning"]["base_model"]["source"] = str(changed)
    (moved / "recover_report.json").write_text(json.dumps(report))
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")  # other content, same model
    with pytest.raises(PerpError, match="now has sha256"):
        stage.run_evaluate(_config(tiny_opt_dir), str(moved), tmp_path / "m2.json")
