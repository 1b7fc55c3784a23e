"""`perp report`: a readable report of a run or a sweep, with PNG plots and the same series as DVC plot files.

`render_report(run_dir)` finds `prune_report.json`, `recover_report.json` and `metrics.json` anywhere under
`run_dir` (see `perp.report.collect`), and writes `run_dir/report/`:

- `report.md` (and `report.html` with `html=True`, self-contained, images inlined);
- PNGs: perplexity of dense, pruned and recovered; zero-shot accuracy per task, dense vs compressed; per-layer
  sparsity and reconstruction error; the recovery loss curve; for a sweep, the sparsity × quality front;
- `plots/*.csv`: the same series, for `dvc plots show`.

For a single run the report opens with what pruning cost and what recovery won back. A sweep (several runs)
opens with a table of runs and the front, and links one sub-report per run. Missing parts are skipped.
"""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perp.errors import PerpError
from perp.io.atomic import atomic_directory, is_complete
from perp.report.collect import Collection, Run, collect, number, ppl_value
from perp.report.document import Bullets, Document, Heading, Image, Paragraph, Table

REPORT_DIR = "report"
STAGE_ORDER = ("dense", "pruned", "recovered", "evaluated")


class ReportError(PerpError):
    """The report cannot be rendered (no such directory, nothing to report)."""


# --------------------------------------------------------------------------------------------- numbers per stage


@dataclass
class StageNumbers:
    """What one model of a run scored; None where unknown."""

    sparsity: Optional[float] = None
    ppl: dict[str, float] = field(default_factory=dict)  # text name → perplexity
    tasks: dict[str, float] = field(default_factory=dict)  # task → acc
    mean_acc: Optional[float] = None

    def ppl_ratio(self, dense: StageNumbers) -> Optional[float]:
        ratios = [self.ppl[t] / dense.ppl[t] for t in self.ppl if dense.ppl.get(t)]
        return max(ratios) if ratios else None


RECOVERY_TEXT = "recovery eval text"


def stage_numbers(run: Run) -> dict[str, StageNumbers]:
    """dense / pruned / recovered (or evaluated) numbers of one run, from whichever artifacts it has."""
    stages: dict[str, StageNumbers] = {}
    dense = StageNumbers(sparsity=None)
    for stage, artifact in run.metrics.items():
        data = artifact.data
        numbers = StageNumbers(sparsity=number(data.get("sparsity")))
        for text, entry in (data.get("perplexity") or {}).items():
            if not isinstance(entry, dict):
                continue
            if (ppl := number(entry.get("ppl"))) is not None:
                numbers.ppl[text] = ppl
            if (dense_ppl := number(entry.get("dense_ppl"))) is not None:
                dense.ppl.setdefault(text, dense_ppl)
        zs = data.get("zeroshot") or {}
        for task, entry in (zs.get("tasks") or {}).items():
            if isinstance(entry, dict):
                if (acc := number(entry.get("acc"))) is not None:
                    numbers.tasks[task] = acc
                if (dense_acc := number(entry.get("dense_acc"))) is not None:
                    dense.tasks.setdefault(task, dense_acc)
        numbers.mean_acc = number(zs.get("mean_acc"))
        if dense.mean_acc is None:
            dense.mean_acc = number(zs.get("dense_mean_acc"))
        stages[stage] = numbers
    if "dense" in stages:  # a metrics file of the dense model itself
        own = stages["dense"]
        dense.ppl.update(own.ppl)
        dense.tasks.update(own.tasks)
        dense.mean_acc = own.mean_acc if own.mean_acc is not None else dense.mean_acc
    dense.sparsity = stages["dense"].sparsity if "dense" in stages else (0.0 if (dense.ppl or dense.tasks) else None)

    # Pruned/recovered perplexity from the recovery report, matched to a metrics text by its data hash.
    if run.recover is not None:
        data = run.recover.data
        text_by_hash = {}
        for artifact in run.metrics.values():
            for text, entry in (artifact.data.get("perplexity") or {}).items():
                if isinstance(entry, dict) and entry.get("data_sha256"):
                    text_by_hash[entry["data_sha256"]] = text
        for stage, key in (("pruned", "ppl_before"), ("recovered", "ppl_after")):
            value = ppl_value(data.get(key))
            if value is None:
                continue
            raw = data.get(key)
            text = text_by_hash.get(raw.get("data_sha256")) if isinstance(raw, dict) else None
            numbers = stages.setdefault(stage, StageNumbers())
            numbers.ppl.setdefault(text or RECOVERY_TEXT, value)
        pruned = stages.get("pruned")
        if pruned is not None and pruned.sparsity is None:
            before = data.get("sparsity_before")
            pruned.sparsity = number(before.get("sparsity") if isinstance(before, dict) else before)
        recovered = stages.get("recovered")
        if recovered is not None and recovered.sparsity is None:
            after = data.get("sparsity_after")
            recovered.sparsity = number(after.get("sparsity") if isinstance(after, dict) else after)
    if run.prune is not None:
        pruned = stages.setdefault("pruned", StageNumbers())
        if pruned.sparsity is None:
            pruned.sparsity = number(run.prune.data.get("achieved_sparsity"))
    if dense.ppl or dense.tasks or dense.mean_acc is not None:
        stages["dense"] = dense
    elif "dense" in stages:
        del stages["dense"]
    return {stage: stages[stage] for stage in sorted(stages, key=_stage_rank)}


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


# --------------------------------------------------------------------------------------------- formatting


def _f(value: Optional[float], digits: int = 2) -> Optional[str]:
    return None if value is None else f"{value:.{digits}f}"


def _pct(value: Optional[float], digits: int = 1) -> Optional[str]:
    return None if value is None else f"{100 * value:.{digits}f}%"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug[:80] or "run"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue())
    return path


def headline(run: Run, stages: dict[str, StageNumbers]) -> list[str]:
    """Plain sentences: what pruning cost and what recovery won back."""
    sentences = []
    dense, pruned, recovered = stages.get("dense"), stages.get("pruned"), stages.get("recovered")
    method = run.prune_method()
    target = run.target_sparsity()
    what = ", ".join(x for x in (method, f"target {target:.0%}" if target is not None else None,
                                 f"measured {pruned.sparsity:.1%}" if pruned and pruned.sparsity is not None else None)
                     if x)
    texts = [t for t in (dense.ppl if dense else {}) if pruned and t in pruned.ppl]
    if dense and pruned and texts:
        text = texts[0]
        d, p = dense.ppl[text], pruned.ppl[text]
        sentences.append(f"**Pruning** ({what}) raised perplexity on `{text}` from {d:.2f} to {p:.2f} "
                         f"(×{p / d:.2f}).")
        if recovered and text in recovered.ppl:
            r = recovered.ppl[text]
            gap = math.log(p) - math.log(d)
            closed = (math.log(p) - math.log(r)) / gap if gap > 0 else None
            won = f": it won back {closed:.0%} of the log-perplexity gap" if closed is not None else ""
            sentences.append(f"**Recovery** ({run.recover_method() or 'unknown method'}) brought it to {r:.2f} "
                             f"(×{r / d:.2f}){won}.")
    elif pruned and recovered and RECOVERY_TEXT in pruned.ppl and RECOVERY_TEXT in recovered.ppl:
        p, r = pruned.ppl[RECOVERY_TEXT], recovered.ppl[RECOVERY_TEXT]
        sentences.append(f"On the recovery's evaluation text, **recovery** ({run.recover_method()}) took "
                         f"perplexity from {p:.2f} (pruned{', ' + what if what else ''}) to {r:.2f}.")
    elif dense and (final := recovered or pruned):
        ratio = final.ppl_ratio(dense)
        if ratio is not None:
            sentences.append(f"The {'recovered' if recovered else 'pruned'} model's perplexity is ×{ratio:.2f} the "
                             f"dense model's (worst text).")
    if dense and dense.mean_acc is not None:
        parts = [f"dense {_pct(dense.mean_acc)}"]
        for stage in ("pruned", "recovered", "evaluated"):
            numbers = stages.get(stage)
            if numbers and numbers.mean_acc is not None:
                parts.append(f"{stage} {_pct(numbers.mean_acc)} ({(numbers.mean_acc - dense.mean_acc) * 100:+.1f} "
                             f"points)")
        if len(parts) > 1:
            sentences.append("Zero-shot mean accuracy: " + ", ".join(parts) + ".")
    return sentences


# --------------------------------------------------------------------------------------------- one run


def _run_document(run: Run, out: Path, title: str, plots: Path) -> Document:
    """One run's report: the headline, then each part its artifacts hold (summary, perplexity, zero-shot, pruning,
    recovery), then the files it was read from; figures go to `out`, their series to `plots`."""
    doc = Document(title)
    stages = stage_numbers(run)
    sentences = headline(run, stages)
    if sentences:
        doc.add(Paragraph(" ".join(sentences)))
    texts = list(dict.fromkeys(t for numbers in stages.values() for t in numbers.ppl))
    if stages:
        _add_summary(doc, run, stages, texts)
    if texts:
        _add_perplexity(doc, stages, texts, out, plots)
    tasks = list(dict.fromkeys(t for numbers in stages.values() for t in numbers.tasks))
    if tasks:
        _add_zeroshot(doc, run, stages, tasks, out, plots)
    if run.prune is not None:
        _add_pruning(doc, run, run.prune.data, out, plots)
    if run.recover is not None:
        _add_recovery(doc, run.recover.data, out, plots)
    sources = [f"`{a.path}`" for a in (run.prune, run.recover) if a is not None]
    sources += [f"`{a.path}` ({stage})" for stage, a in run.metrics.items()]
    if sources:
        doc.add(Paragraph("Sources: " + ", ".join(sources), note=True))
    return doc


def _add_summary(doc: Document, run: Run, stages: dict[str, StageNumbers], texts: list[str]) -> None:
    """The summary table (per stage: sparsity, perplexity per text and zero-shot mean, each vs dense), and the
    gate inputs of the run's final metrics."""
    dense = stages.get("dense")
    header = ["model", "sparsity"] + [f"ppl {t}" for t in texts] + ["zero-shot mean"]
    rows = [_summary_row(stage, numbers, texts, dense) for stage, numbers in stages.items()]
    doc.add(Heading("Summary"), Table(header, rows))
    final = run.final_metrics()
    gates = (final.data.get("gates") if final else None) or {}
    if gates:
        doc.add(Paragraph("Gate inputs (from `metrics.json`): " + ", ".join(
            f"{k} = {_f(number(v), 4) if number(v) is not None else '—'}" for k, v in gates.items()), note=True))


def _summary_row(stage: str, numbers: StageNumbers, texts: list[str], dense: Optional[StageNumbers]) -> list[Any]:
    """One stage's summary row; a compressed stage's numbers carry their ratio (or drop) vs dense."""
    row: list[Any] = [stage, _pct(numbers.sparsity)]
    for text in texts:
        value = numbers.ppl.get(text)
        cell = _f(value)
        if value is not None and dense and stage != "dense" and dense.ppl.get(text):
            cell = f"{cell} (×{value / dense.ppl[text]:.2f})"
        row.append(cell)
    acc = _pct(numbers.mean_acc)
    if numbers.mean_acc is not None and dense and dense.mean_acc is not None and stage != "dense":
        acc = f"{acc} ({(numbers.mean_acc - dense.mean_acc) * 100:+.1f} pts)"
    row.append(acc)
    return row


def _add_perplexity(doc: Document, stages: dict[str, StageNumbers], texts: list[str], out: Path,
                    plots: Path) -> None:
    """Perplexity per text and stage: the bar chart and `plots/perplexity.csv`."""
    from perp.report import figures

    series = {stage: dict(numbers.ppl) for stage, numbers in stages.items()}
    image = figures.grouped_bars(out / "perplexity.png", texts, series, title="Perplexity (lower is better)",
                                 ylabel="perplexity", log_if_spread=True)
    _write_csv(plots / "perplexity.csv", ["text", "model", "ppl"],
               [[t, s, v] for s, values in series.items() for t, v in values.items()])
    if image:
        shown = [stage for stage in stages if any(t in stages[stage].ppl for t in texts)]
        doc.add(Heading("Perplexity: " + ", ".join(shown)), Image(image, "perplexity"))
        if RECOVERY_TEXT in texts:
            doc.add(Paragraph(f"`{RECOVERY_TEXT}`: `ppl_before`/`ppl_after` from `recover_report.json`, on the "
                              "recovery's own held-out slice.", note=True))


def _add_zeroshot(doc: Document, run: Run, stages: dict[str, StageNumbers], tasks: list[str], out: Path,
                  plots: Path) -> None:
    """Zero-shot accuracy per task (and the mean) and stage: the bar chart, `plots/zeroshot.csv`, and the final
    metrics' settings and per-task table."""
    from perp.report import figures

    series = {stage: dict(numbers.tasks) for stage, numbers in stages.items() if numbers.tasks}
    for stage, numbers in stages.items():
        if stage in series and numbers.mean_acc is not None:
            series[stage]["mean"] = numbers.mean_acc
    groups = tasks + (["mean"] if any("mean" in v for v in series.values()) else [])
    image = figures.grouped_bars(out / "zeroshot.png", groups, series, title="Zero-shot accuracy (acc)",
                                 ylabel="accuracy (%)", percent=True)
    _write_csv(plots / "zeroshot.csv", ["task", "model", "acc"],
               [[t, s, v] for s, values in series.items() for t, v in values.items()])
    if image:
        doc.add(Heading("Zero-shot accuracy per task"), Image(image, "zero-shot accuracy"))
    final = run.final_metrics()
    zs = (final.data.get("zeroshot") or {}) if final else {}
    if zs:
        doc.add(Paragraph(f"lm-eval {zs.get('lm_eval_version', '?')}, {zs.get('num_fewshot', 0)}-shot, "
                          f"limit {zs.get('limit') or 'none'}; the mean is over acc.", note=True))
        rows = [_zeroshot_row(task, entry) for task, entry in (zs.get("tasks") or {}).items()]
        doc.add(Table(["task", "version", "samples", "dense acc", "acc", "acc_norm", "drop (pts)"], rows))


def _zeroshot_row(task: str, entry: dict[str, Any]) -> list[Any]:
    """One task of metrics.json's `zeroshot` as a table row; the drop is recomputed when the file lacks it."""
    stderr = number(entry.get("acc_stderr"))
    acc, dense_acc = number(entry.get("acc")), number(entry.get("dense_acc"))
    drop = number(entry.get("drop_points"))
    if drop is None and acc is not None and dense_acc is not None:
        drop = (dense_acc - acc) * 100
    return [task, entry.get("version"), entry.get("samples"), _pct(dense_acc),
            (_pct(acc) or "—") + (f" ± {100 * stderr:.1f}" if stderr else ""),
            _pct(number(entry.get("acc_norm"))), _f(drop, 1)]


def _add_pruning(doc: Document, run: Run, data: dict[str, Any], out: Path, plots: Path) -> None:
    """What the pruning report says: method, target and achieved sparsity, reconstruction error; the per-layer
    figure and `plots/layers.csv` when it has layers."""
    from perp.report import figures

    layers = data.get("layers")
    layers = layers if isinstance(layers, dict) else {}
    target = number(data.get("target_sparsity"))
    image = figures.layers_figure(out / "layers.png", layers, target) if layers else None
    if layers:
        _write_csv(plots / "layers.csv", ["layer", "linear", "name", "sparsity", "rel_error"], _layer_rows(layers))
    facts = [f"method: **{run.prune_method() or '?'}**",
             f"target sparsity: {_pct(target) or '—'}",
             f"achieved sparsity: {_pct(number(data.get('achieved_sparsity')), 2) or '—'}"]
    if number(data.get("mean_rel_error")) is not None:
        facts.append(f"mean reconstruction error ‖WX − ŴX‖² / ‖WX‖²: {number(data['mean_rel_error']):.4g}")
    if image:
        has_error = any(isinstance(v, dict) and number(v.get("rel_error")) is not None for v in layers.values())
        title = "per-layer sparsity" + (" and reconstruction error" if has_error else "")
        doc.add(Heading(f"Pruning: {title}"), Bullets(facts), Image(image, title))
    else:
        doc.add(Heading("Pruning"), Bullets(facts))


def _layer_rows(layers: dict[str, Any]) -> list[list[Any]]:
    """`plots/layers.csv` rows: layer index, Linear, name, sparsity, relative reconstruction error."""
    from perp.report import figures

    rows = []
    for name, stats in layers.items():
        if isinstance(stats, dict):
            index, linear = figures.parse_layer_name(name)
            rows.append([index, linear, name, number(stats.get("sparsity")), number(stats.get("rel_error"))])
    return rows


def _add_recovery(doc: Document, data: dict[str, Any], out: Path, plots: Path) -> None:
    """What the recovery report says, with the loss curve (figure and `plots/loss.csv`) when it has one."""
    from perp.report import figures

    curve = data.get("loss_curve") if isinstance(data.get("loss_curve"), list) else []
    image = figures.loss_figure(out / "loss.png", curve) if curve else None
    if curve:
        _write_csv(plots / "loss.csv", ["step", "loss"],
                   [[p[0], p[1]] for p in curve if isinstance(p, (list, tuple)) and len(p) >= 2])
    doc.add(Heading("Recovery"), Bullets(_recovery_facts(data)))
    if image:
        doc.add(Image(image, "recovery loss curve"))


def _recovery_facts(data: dict[str, Any]) -> list[str]:
    """The recovery's method (and mode), perplexity before → after, and trainable share, as bullet points."""
    facts = [f"method: **{data.get('method', '?')}**" + (f" ({data['mode']})" if data.get("mode") else "")]
    before, after = ppl_value(data.get("ppl_before")), ppl_value(data.get("ppl_after"))
    if before is not None and after is not None:
        facts.append(f"perplexity on its held-out slice: {before:.2f} → {after:.2f}")
    for key, label in (("trainable_fraction", "trainable fraction"), ("trainable_params", "trainable parameters")):
        if data.get(key) is not None:
            value = data[key]
            facts.append(f"{label}: {_pct(value, 3) if key == 'trainable_fraction' else f'{value:,}'}")
    return facts


# --------------------------------------------------------------------------------------------- sweep


def front_points(collection: Collection) -> tuple[list[dict[str, Any]], Optional[float]]:
    points, dense_acc = [], None
    for run in collection.runs:
        stages = stage_numbers(run)
        dense = stages.get("dense")
        if dense and dense.mean_acc is not None:
            dense_acc = dense_acc if dense_acc is not None else dense.mean_acc
        for stage, numbers in stages.items():
            if stage == "dense":
                continue
            ratio = numbers.ppl_ratio(dense) if dense else None
            points.append({"label": run.label, "stage": stage, "sparsity": numbers.sparsity, "ppl_ratio": ratio,
                           "mean_acc": numbers.mean_acc, "prune": run.prune_method(),
                           "recover": run.recover_method(), "target": run.target_sparsity()})
    return points, dense_acc


def _sweep_document(collection: Collection, out: Path, plots: Path, html: bool) -> Document:
    from perp.report import figures

    doc = Document(f"Sweep report: {collection.root.name}")
    points, dense_acc = front_points(collection)
    recovered = [p for p in points if p["stage"] == "recovered" and p["ppl_ratio"] is not None]
    if recovered:
        best = min(recovered, key=lambda p: (p["ppl_ratio"], -(p["sparsity"] or 0)))
        doc.add(Paragraph(f"{len(collection.runs)} runs. Best recovered perplexity ratio: **×{best['ppl_ratio']:.2f}** "
                          f"({best['label']}, sparsity {_pct(best['sparsity'])})."))
    else:
        doc.add(Paragraph(f"{len(collection.runs)} runs."))
    image = figures.front_figure(out / "front.png", points, dense_acc)
    _write_csv(plots / "front.csv", ["run", "stage", "sparsity", "ppl_ratio", "mean_acc", "prune", "recover"],
               [[p["label"], p["stage"], p["sparsity"], p["ppl_ratio"], p["mean_acc"], p["prune"], p["recover"]]
                for p in points])
    if image:
        doc.add(Heading("Sparsity × quality front"), Image(image, "sparsity × quality front"),
                Paragraph("Dashed lines join the runs no other run beats on both sparsity and quality.", note=True))
    rows = []
    for run in collection.runs:
        stages = stage_numbers(run)
        dense = stages.get("dense")
        pruned, rec = stages.get("pruned"), stages.get("recovered") or stages.get("evaluated")
        final = rec or pruned
        sub = Path("runs") / _slug(run.label) / "report.md"
        rows.append([f"[{run.label}]({sub.as_posix()})", run.prune_method(), _pct(run.target_sparsity()),
                     _pct(final.sparsity if final else None),
                     run.recover_method(),
                     _f(pruned.ppl_ratio(dense)) if pruned and dense else None,
                     _f(rec.ppl_ratio(dense)) if rec and dense else None,
                     _pct(rec.mean_acc) if rec else None,
                     _f((dense.mean_acc - rec.mean_acc) * 100, 1) if rec and dense and rec.mean_acc is not None
                     and dense.mean_acc is not None else None])
    doc.add(Heading("Runs"), Table(["run", "pruning", "target", "sparsity", "recovery", "ppl ratio pruned",
                                    "ppl ratio final", "zero-shot mean", "drop (pts)"], rows))
    for run in collection.runs:
        sub_dir = out / "runs" / _slug(run.label)
        sub_doc = _run_document(run, sub_dir, f"Run {run.label}", sub_dir / "plots")
        _write_document(sub_doc, sub_dir, html)
    return doc


# --------------------------------------------------------------------------------------------- entry point


def _write_document(doc: Document, out: Path, html: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(doc.to_markdown(out))
    if html:
        (out / "report.html").write_text(doc.to_html(out))
    return md


def render_report(run_dir: Path, html: bool = False, out_dir: Optional[Path] = None) -> Path:
    """Render the report of a run (or a sweep) directory; returns the Markdown file's path.

    The report goes to `out_dir` (default `run_dir/report/`), replacing an earlier one there.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"'{run_dir}' is not a directory (expected a run or sweep directory holding "
                          "prune_report.json, recover_report.json and/or metrics.json)")
    collection = collect(run_dir)
    if not collection.runs:
        raise ReportError(f"nothing to report in '{run_dir}': no prune_report.json, recover_report.json or "
                          "metrics.json under it")
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise ReportError(f"--out '{out}' would replace the run directory it reports on; name a new directory")
    _forget_unmarked_report(out)
    with atomic_directory(out, kind="report") as staging:  # whole, then renamed into place (links are relative)
        plots = staging / "plots"
        if collection.is_sweep:
            doc = _sweep_document(collection, staging, plots, html)
        else:
            run = collection.runs[0]
            doc = _run_document(run, staging, f"Run report: {run_dir.resolve().name}", plots)
        if collection.problems:
            doc.add(Heading("Skipped"), Bullets(collection.problems))
        _write_document(doc, staging, html)
    return out / "report.md"


_REPORT_ENTRIES = {"report.md", "report.html", "plots"}


def _forget_unmarked_report(out: Path) -> None:
    """A report directory written before reports carried the completion marker (report.md and only what a report
    holds) is perp's own: remove it so it can be replaced. Anything else is left to the output check."""
    if not out.is_dir() or is_complete(out) or not (out / "report.md").is_file():
        return
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        return
    entries = list(out.iterdir())
    if all(entry.name in _REPORT_ENTRIES or entry.suffix == ".png" for entry in entries):
        shutil.rmtree(out)


__all__ = ["REPORT_DIR", "ReportError", "StageNumbers", "collect", "front_points", "headline", "render_report",
           "stage_numbers"]
