"""`perp report`: real, non-blank PNGs, the headline numbers, DVC plot files, sweeps, and missing parts."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from perp.report import ReportError, render_report
from perp.report.collect import collect
from perp.report.figures import pareto_front

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
TASKS = ("boolq", "rte", "hellaswag", "arc_easy")
HASH = "d" * 64


def _metrics(model_dir: Path, sparsity: float, ppl: float, dense_ppl: float, drop: float) -> dict:
    dense_acc = {t: 0.30 + 0.1 * i for i, t in enumerate(TASKS)}
    tasks = {t: {"acc": dense_acc[t] - drop, "acc_stderr": 0.02, "acc_norm": None, "acc_norm_stderr": None,
                 "dense_acc": dense_acc[t], "version": 1.0, "samples": 50, "drop_points": drop * 100} for t in TASKS}
    mean, dense_mean = sum(dense_acc.values()) / 4 - drop, sum(dense_acc.values()) / 4
    return {"model": {"source": str(model_dir), "path": str(model_dir), "sha256": "a" * 64, "dense_sha256": "b" * 64},
            "sparsity": sparsity, "target_sparsity": sparsity,
            "perplexity": {"wiki": {"ppl": ppl, "dense_ppl": dense_ppl, "ratio": ppl / dense_ppl, "tokens": 1023,
                                    "windows": 1, "seqlen": 1024, "data_sha256": HASH}},
            "zeroshot": {"tasks": tasks, "mean_acc": mean, "dense_mean_acc": dense_mean,
                         "drop_points": (dense_mean - mean) * 100, "lm_eval_version": "0.4.13", "limit": 50},
            "gates": {"ppl_ratio": ppl / dense_ppl, "zeroshot_drop_points": (dense_mean - mean) * 100,
                      "sparsity": sparsity}}


def make_run(root: Path, sparsity: float = 0.5, pruned_ppl: float = 54.1, recovered_ppl: float = 38.2,
             seed: int = 0, pruned_metrics: bool = True) -> Path:
    """A run laid out like `dvc repro`'s: pruned/, recovered/, metrics.json of the recovered model."""
    rng = random.Random(seed)
    pruned, recovered = root / "pruned", root / "recovered"
    pruned.mkdir(parents=True)
    recovered.mkdir()
    layers = {f"model.layers.{i}.{name}": {"sparsity": sparsity + rng.uniform(-0.003, 0.003),
                                           "rel_error": 0.01 * (i + 1) * rng.uniform(0.5, 2.0)}
              for i in range(6) for name in LINEARS}
    (pruned / "prune_report.json").write_text(json.dumps(
        {"layers": layers, "method": "wanda", "target_sparsity": sparsity, "achieved_sparsity": sparsity}))
    curve = [[step, 3.5 * math.exp(-step / 30) + 2.5 + rng.uniform(-0.1, 0.1)] for step in range(1, 101)]
    (recovered / "recover_report.json").write_text(json.dumps(
        {"loss_curve": curve, "method": "masklora", "model": str(pruned),
         "ppl_before": {"ppl": pruned_ppl, "data_sha256": HASH},
         "ppl_after": {"ppl": recovered_ppl, "data_sha256": HASH}}))
    (root / "metrics.json").write_text(json.dumps(_metrics(recovered, sparsity, recovered_ppl, 23.94, 0.01)))
    if pruned_metrics:
        (pruned / "metrics.json").write_text(json.dumps(_metrics(pruned, sparsity, pruned_ppl, 23.94, 0.05)))
    return root


def assert_real_png(path: Path) -> None:
    """A PNG that decodes, of a real size, whose pixels are not one flat colour."""
    import numpy as np
    from matplotlib.image import imread

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300, (path, pixels.shape)
    rgb = pixels[..., :3]
    assert float(np.var(rgb)) > 1e-3, f"{path} is blank"
    non_white = float((rgb.min(axis=-1) < 0.9).mean())
    assert non_white > 0.02, f"{path} is almost empty ({non_white:.3f} of pixels drawn)"
    assert len(np.unique(rgb.reshape(-1, 3).round(2), axis=0)) > 8, f"{path} has almost no colours"


def test_single_run_report(tmp_path):
    run = make_run(tmp_path / "run")
    path = render_report(run, html=True)
    assert path == run / "report" / "report.md"
    text = path.read_text()
    # what pruning cost and what recovery won back, at a glance
    assert "raised perplexity on `wiki` from 23.94 to 54.10 (×2.26)" in text
    assert "brought it to 38.20 (×1.60): it won back 43% of the log-perplexity gap" in text
    assert "Zero-shot mean accuracy: dense 45.0%, pruned 40.0% (-5.0 points), recovered 44.0% (-1.0 points)" in text
    assert "| recovered | 50.0% | 38.20 (×1.60) |" in text
    for name in ("perplexity", "zeroshot", "layers", "loss"):
        assert f"({name}.png)" in text
        assert_real_png(run / "report" / f"{name}.png")
    html = (run / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    with open(run / "report" / "plots" / "perplexity.csv") as handle:
        rows = {(r["model"], r["text"]): float(r["ppl"]) for r in csv.DictReader(handle)}
    assert rows == {("dense", "wiki"): 23.94, ("pruned", "wiki"): 54.1, ("recovered", "wiki"): 38.2}
    for name, header in (("layers", "layer,linear,name,sparsity,rel_error"), ("loss", "step,loss"),
                         ("zeroshot", "task,model,acc")):
        content = (run / "report" / "plots" / f"{name}.csv").read_text().splitlines()
        assert content[0] == header and len(content) > 4


def test_pruned_ppl_comes_from_the_recovery_report_when_only_the_final_model_was_evaluated(tmp_path):
    run = make_run(tmp_path / "run", pruned_metrics=False)
    text = render_report(run).read_text()
    assert "from 23.94 to 54.10" in text and "won back 43%" in text


def test_missing_parts_are_skipped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(run / "model", 0.5, 30.0, 24.0, 0.02)))
    (run / "broken").mkdir()
    (run / "broken" / "prune_report.json").write_text("{not json")
    text = render_report(run).read_text()
    assert "perplexity.png" in text and "zeroshot.png" in text
    assert "layers.png" not in text and "loss.png" not in text
    assert "## Skipped" in text and "broken/prune_report.json" in text
    assert_real_png(run / "report" / "perplexity.png")

    only_loss = tmp_path / "only-loss"
    (only_loss / "recovered").mkdir(parents=True)
    (only_loss / "recovered" / "recover_report.json").write_text(json.dumps({"loss_curve": [[1, 3.0], [2, 2.5]]}))
    text = render_report(only_loss).read_text()
    assert "loss.png" in text and "perplexity.png" not in text


def test_nothing_to_report(tmp_path):
    with pytest.raises(ReportError, match="nothing to report"):
        render_report(tmp_path)
    with pytest.raises(ReportError, match="is not a directory"):
        render_report(tmp_path / "missing")


def test_sweep_report_shows_the_front(tmp_path):
    sweep = tmp_path / "sweep"
    for index, sparsity in enumerate((0.3, 0.5, 0.7)):
        make_run(sweep / f"sp{sparsity}", sparsity=sparsity, pruned_ppl=24 * math.exp(3 * sparsity ** 2),
                 recovered_ppl=24 * math.exp(2 * sparsity ** 2), seed=index, pruned_metrics=index % 2 == 0)
    collection = collect(sweep)
    assert collection.is_sweep and sorted(r.label for r in collection.runs) == ["sp0.3", "sp0.5", "sp0.7"]
    path = render_report(sweep)
    text = path.read_text()
    assert "Sparsity × quality front" in text and "(front.png)" in text
    assert_real_png(sweep / "report" / "front.png")
    assert "[sp0.7](runs/sp0.7/report.md)" in text
    for label in ("sp0.3", "sp0.7"):
        sub = sweep / "report" / "runs" / label
        assert (sub / "report.md").is_file()
        assert_real_png(sub / "layers.png")
    with open(sweep / "report" / "plots" / "front.csv") as handle:
        rows = list(csv.DictReader(handle))
    recovered = sorted((float(r["sparsity"]), float(r["ppl_ratio"])) for r in rows if r["stage"] == "recovered")
    assert [s for s, _ in recovered] == [0.3, 0.5, 0.7]
    assert all(a[1] < b[1] for a, b in zip(recovered, recovered[1:]))


def test_pareto_front():
    points = [(0.3, 1.2), (0.5, 1.6), (0.5, 2.0), (0.6, 1.5), (0.7, 2.7)]
    assert pareto_front(points) == [(0.3, 1.2), (0.6, 1.5), (0.7, 2.7)]


def test_cli_report(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(run / "model", 0.5, 30.0, 24.0, 0.02)))
    result = cli("report", str(run), "--html", "--json", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["report"] == str(tmp_path / "out" / "report.md") and Path(payload["html"]).is_file()
    result = cli("report", str(tmp_path / "nope"))
    assert result.returncode == 2 and "is not a directory" in result.stderr and "Traceback" not in result.stderr


def test_pipeline_workdir_links_stages_by_path(tmp_path):
    """`perp run`'s flat work directory: mask-*/, recover-*/, evaluate-*/ side by side, linked by model paths."""
    work = tmp_path / "runs"
    for index, (method, recovery) in enumerate((("wanda", "norm"), ("sparsegpt", "masklora"))):
        staging = make_run(tmp_path / f"staging{index}")
        mask, recover, evaluate = work / f"mask-{index}", work / f"recover-{index}", work / f"evaluate-{index}"
        for directory in (mask, recover, evaluate):
            directory.mkdir(parents=True)
        prune = json.loads((staging / "pruned" / "prune_report.json").read_text())
        (mask / "prune_report.json").write_text(json.dumps({**prune, "method": method}))
        report = json.loads((staging / "recovered" / "recover_report.json").read_text())
        (recover / "recover_report.json").write_text(json.dumps({**report, "model": str(mask), "method": recovery}))
        metrics = json.loads((staging / "metrics.json").read_text())
        metrics["model"].update(source=str(recover), path=str(recover))
        (evaluate / "metrics.json").write_text(json.dumps(metrics))
    collection = collect(work)
    assert sorted(r.label for r in collection.runs) == ["sparsegpt 50% → masklora", "wanda 50% → norm"]
    for run in collection.runs:
        assert run.prune is not None and run.recover is not None and set(run.metrics) == {"recovered"}
        assert run.recover.data["model"] == str(run.prune.directory)
