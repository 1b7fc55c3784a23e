"""The `perp evaluate` stage: metrics.json's shape, measured sparsity, relative figures, the cached dense baseline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from perp.config import load_params
from perp.evaluate import stage

TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "Pack my box with five dozen liquor jugs.\n") * 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A dense tiny LLaMA and the same weights with the smallest half of every decoder Linear zeroed."""
    from perp.models.families import adapter_for
    from perp.models.tiny import build_tiny_model, byte_tokenizer

    root = tmp_path_factory.mktemp("models")
    dense, pruned = root / "dense", root / "pruned"
    build_tiny_model("llama").save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    model = build_tiny_model("llama")
    with torch.no_grad():
        for _, linear in adapter_for(model).named_decoder_linears(model):
            weight = linear.weight
            threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
            weight[weight.abs() <= threshold] = 0
    model.save_pretrained(pruned)
    byte_tokenizer().save_pretrained(pruned)
    return dense, pruned


@pytest.fixture
def baselines(tmp_path, monkeypatch):
    directory = tmp_path / "baselines"
    directory.mkdir()
    monkeypatch.setattr(stage, "cache_dir", lambda *parts: directory)
    return directory


def _config(tmp_path: Path, dense: Path, shared_data: Path, tasks: list[str]):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    head = tmp_path / "tasks"
    head.mkdir(exist_ok=True)
    for task in tasks:
        lines = (shared_data / "tasks" / f"{task}.jsonl").read_text().splitlines()[:20]
        (head / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return load_params(None, [
        f"model.name={dense}",
        (f"evaluate.perplexity=[{{name: small, source: '{text}', seqlen: 64, max_windows: 4}}, "
         f"{{name: embedded, source: 'embedded:wiki-eval', seqlen: 48, max_windows: 2}}]"),
        f"evaluate.zeroshot.tasks={json.dumps(tasks)}", f"evaluate.zeroshot.task_data={head}",
        "evaluate.zeroshot.limit=4", "evaluate.zeroshot.batch_size=4", "evaluate.batch_size=2",
        "prune.sparsity=0.5",
    ])


def test_metrics_shape_and_cached_baseline(models, baselines, shared_data, tmp_path, monkeypatch, model_loads):
    dense, pruned = models
    config = _config(tmp_path, dense, shared_data, ["arc_easy", "rte"])
    calls = model_loads
    metrics = stage.run_evaluate(config, str(pruned), tmp_path / "out" / "metrics.json")
    assert calls == [str(pruned), str(dense)]  # the candidate, then the dense baseline (not cached yet)

    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk) == {"model", "sparsity", "target_sparsity", "planned_sparsity", "planned_pruned_weights",
                            "perplexity", "zeroshot", "gates"}
    assert on_disk["planned_pruned_weights"] == on_disk["model"]["decoder_linear_zeros"]  # halved exactly
    assert {"source", "sha256"} <= set(on_disk["model"]) and on_disk["model"]["source"] == str(pruned)
    # no report records a base model: the dense baseline is model.name, and metrics.json says so
    assert on_disk["model"]["dense_source"] == str(dense) and on_disk["model"]["dense_from"] == "model.name"
    assert on_disk["model"]["target_sparsity_from"] == "config" and on_disk["model"]["pruning_record"] is None
    assert on_disk["sparsity"] == pytest.approx(0.5, abs=1e-3)  # measured from the weights
    assert on_disk["target_sparsity"] == 0.5
    # no prune_report.json here: the plan of the config's prune section (half of every row of every Linear)
    assert on_disk["planned_sparsity"] == 0.5 and on_disk["model"]["planned_sparsity_from"] == "config"
    assert set(on_disk["perplexity"]) == {"small", "embedded"}
    for entry in on_disk["perplexity"].values():
        assert {"ppl", "dense_ppl", "ratio", "tokens", "windows", "seqlen", "data_sha256"} <= set(entry)
        assert entry["ratio"] == pytest.approx(entry["ppl"] / entry["dense_ppl"])
        assert entry["ppl"] != entry["dense_ppl"]
    assert on_disk["perplexity"]["small"]["windows"] == 4 and on_disk["perplexity"]["small"]["seqlen"] == 64
    zs = on_disk["zeroshot"]
    assert {"tasks", "mean_acc", "dense_mean_acc", "drop_points"} <= set(zs)
    assert set(zs["tasks"]) == {"arc_easy", "rte"} and zs["limit"] == 4 and zs["lm_eval_version"]
    assert zs["mean_acc"] == pytest.approx((zs["tasks"]["arc_easy"]["acc"] + zs["tasks"]["rte"]["acc"]) / 2)
    assert zs["drop_points"] == pytest.approx((zs["dense_mean_acc"] - zs["mean_acc"]) * 100)
    gates = on_disk["gates"]
    assert gates == {"ppl_ratio": max(e["ratio"] for e in on_disk["perplexity"].values()),
                     "zeroshot_drop_points": zs["drop_points"], "sparsity": on_disk["sparsity"]}

    # DVC plot series next to metrics.json
    with open(tmp_path / "out" / "plots" / "eval_perplexity.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["text"] for r in rows] == ["small", "embedded"]
    assert float(rows[0]["ppl"]) == pytest.approx(on_disk["perplexity"]["small"]["ppl"])
    assert (tmp_path / "out" / "plots" / "eval_zeroshot.csv").read_text().startswith("task,dense_acc,acc")

    # The dense baseline is cached: a second evaluation loads only the candidate and reports the same numbers.
    assert len(list(baselines.glob("perplexity-*.json"))) == 2 and len(list(baselines.glob("zeroshot-*.json"))) == 2
    calls.clear()
    again = stage.run_evaluate(config, str(pruned), tmp_path / "again")
    assert calls == [str(pruned)]
    assert again == metrics
    assert (tmp_path / "again" / "metrics.json").is_file()


def test_dense_model_is_its_own_baseline(models, baselines, shared_data, tmp_path, monkeypatch, model_loads):
    dense, _ = models
    config = _config(tmp_path, dense, shared_data, ["rte"])
    calls = model_loads
    metrics = stage.run_evaluate(config, str(dense), tmp_path / "metrics.json")
    assert calls == [str(dense)]
    assert metrics["sparsity"] == 0.0 and metrics["target_sparsity"] is None and metrics["planned_sparsity"] is None
    assert all(e["ratio"] == 1.0 for e in metrics["perplexity"].values())
    assert metrics["gates"]["zeroshot_drop_points"] == 0.0
    assert len(list(baselines.glob("*.json"))) == 3  # written for the next compressed model


def test_bad_zeroshot_task_fails_before_any_model_is_loaded(models, baselines, shared_data, tmp_path, monkeypatch,
                                                            model_loads):
    from perp.evaluate.zeroshot import TaskDataError

    dense, pruned = models
    config = _config(tmp_path, dense, shared_data, ["rte"])
    config.evaluate.zeroshot.tasks = ["rte", "piqa"]  # no piqa.jsonl in the task directory
    calls = model_loads
    with pytest.raises(TaskDataError, match=r"task 'piqa': .*piqa.jsonl does not exist"):
        stage.run_evaluate(config, str(pruned), tmp_path / "metrics.json")
    assert calls == [] and not (tmp_path / "metrics.json").exists()


def test_offload_gives_the_same_perplexity_layer_by_layer(models, baselines, shared_data, tmp_path):
    dense, pruned = models
    config = _config(tmp_path, dense, shared_data, [])
    whole = stage.run_evaluate(config, str(pruned), tmp_path / "whole" / "metrics.json")
    config = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"offload": True})})
    layered = stage.run_evaluate(config, str(pruned), tmp_path / "layered" / "metrics.json")
    for name in ("small", "embedded"):
        assert layered["perplexity"][name]["ppl"] == pytest.approx(whole["perplexity"][name]["ppl"], rel=1e-5)
        assert layered["perplexity"][name]["ppl"] > layered["perplexity"][name]["dense_ppl"]


def test_offload_with_zeroshot_is_a_config_error():
    from perp.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluate.*zero-shot tasks need the whole model"):
        load_params(None, ["evaluate.offload=true", "evaluate.zeroshot.tasks=[boolq]"])


def test_sparsity_gate_plan_of_an_owl_run_without_counts_uses_its_layer_sparsities():
    from perp.models.families import LLAMA
    from perp.models.tiny import build_tiny_model
    from perp.prune.patterns import pruned_per

    model = build_tiny_model("llama", 0)
    config = load_params(None, ["model.name=tiny-llama"])
    prune = {**config.prune.model_dump(mode="json"), "owl_lambda": 0.1, "owl_m": 2.0}
    chosen = {"0": 0.4, "1": 0.6}
    expected = sum(module.out_features * pruned_per(module.in_features, chosen[str(index)])
                   for index, layer in enumerate(LLAMA.layers(model)) for module in LLAMA.linears(layer).values())
    report = {"config": {"prune": prune}, "owl": {"layer_sparsity": chosen}}
    assert stage._planned_zeros(report, model, LLAMA, config) == (expected, "prune_report")
    # an OWL run whose layer sparsities are unknown has no plan to hold it to
    assert stage._planned_zeros({"config": {"prune": prune}}, model, LLAMA, config) == (None, None)
