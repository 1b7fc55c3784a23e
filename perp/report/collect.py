"""Find a run's (or a sweep's) artifacts and link them into runs: pruned model → recovered model → metrics.

Artifacts, anywhere under the directory:

- `prune_report.json`: in the pruned checkpoint's directory (`layers`, `method`, `target_sparsity`, ...);
- `recover_report.json`: in the recovered checkpoint's directory (`loss_curve`, `ppl_before`, `ppl_after`,
  `method`, and `model`, the pruned model it started from);
- `metrics.json`: from `perp evaluate` (`model.path` / `model.source` name the evaluated checkpoint).

A recovery links to the pruning whose directory is its `model`; a metrics file links to the pruning or recovery
whose directory holds the model it evaluated. When paths do not resolve (a directory that was moved), a lone
pruning and a lone recovery are paired, and lone metrics go with the last stage. One run is one pruning with one
recovery (either may be missing); a sweep is several runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perp.layout import METRICS_FILE, PRUNE_REPORT, RECOVER_REPORT

METRICS = METRICS_FILE
_SKIP_PARTS = ("report",)


@dataclass
class Artifact:
    path: Path
    data: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.path.parent


@dataclass
class Run:
    label: str
    prune: Optional[Artifact] = None
    recover: Optional[Artifact] = None
    metrics: dict[str, Artifact] = field(default_factory=dict)  # stage ("dense", "pruned", "recovered", other) → file

    # ---- what the run reports, whatever subset of artifacts it has
    def final_metrics(self) -> Optional[Artifact]:
        for stage in ("recovered", "pruned"):
            if stage in self.metrics:
                return self.metrics[stage]
        others = [a for s, a in self.metrics.items() if s != "dense"]
        return others[-1] if others else self.metrics.get("dense")

    def prune_method(self) -> Optional[str]:
        if self.prune is None:
            return None
        data = self.prune.data
        pattern = data.get("pattern") or ((data.get("config") or {}).get("prune") or {}).get("pattern")
        method = data.get("method")
        return f"{method} {pattern}" if method and pattern and pattern != "unstructured" else method

    def recover_method(self) -> Optional[str]:
        return self.recover.data.get("method") if self.recover is not None else None

    def target_sparsity(self) -> Optional[float]:
        if self.prune is not None and number(self.prune.data.get("target_sparsity")) is not None:
            return number(self.prune.data.get("target_sparsity"))
        final = self.final_metrics()
        return number(final.data.get("target_sparsity")) if final else None


@dataclass
class Collection:
    root: Path
    runs: list[Run]
    problems: list[str]

    @property
    def is_sweep(self) -> bool:
        return len(self.runs) > 1


def number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def ppl_value(value: Any) -> Optional[float]:
    """`ppl_before`/`ppl_after` are a number or a perplexity result ({"ppl": ...})."""
    if isinstance(value, dict):
        return number(value.get("ppl"))
    return number(value)


def _resolve(path: Any, base: Path) -> Optional[Path]:
    if not isinstance(path, str) or not path or "://" in path:
        return None
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        return candidate.resolve()
    except OSError:
        return None


def _find(root: Path, name: str, problems: list[str]) -> list[Artifact]:
    found = []
    for path in sorted(root.rglob(name)):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative) or (relative and relative[0] in _SKIP_PARTS):
            continue  # staging directories of atomic writes, and our own report output
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            problems.append(f"`{path.relative_to(root)}` could not be read ({type(error).__name__}); skipped")
            continue
        if not isinstance(data, dict):
            problems.append(f"`{path.relative_to(root)}` is not a JSON object; skipped")
            continue
        found.append(Artifact(path, data))
    return found


def _metrics_model_dir(artifact: Artifact) -> list[Path]:
    model = artifact.data.get("model") or {}
    if not isinstance(model, dict):
        return []
    paths = []
    for key in ("path", "source"):
        for base in (Path.cwd(), artifact.directory):
            resolved = _resolve(model.get(key), base)
            if resolved is not None:
                paths.append(resolved)
    return paths


def _label(root: Path, directory: Path) -> str:
    try:
        relative = directory.relative_to(root).as_posix()
    except ValueError:
        relative = directory.name
    return relative if relative not in ("", ".") else root.name


def collect(root: Path) -> Collection:
    """Every artifact under `root`, linked into runs."""
    root = Path(root).resolve()
    problems: list[str] = []
    prunes = _find(root, PRUNE_REPORT, problems)
    recovers = _find(root, RECOVER_REPORT, problems)
    metrics = _find(root, METRICS, problems)
    prune_by_dir = {p.directory.resolve(): p for p in prunes}
    recover_by_dir = {r.directory.resolve(): r for r in recovers}
    runs = _pruning_runs(root, prunes, recovers, _link_recoveries(prunes, recovers, prune_by_dir))
    leftovers = [artifact for artifact in metrics if not _place_metrics(artifact, runs, prune_by_dir, recover_by_dir)]
    _add_leftover_metrics(root, runs, leftovers)
    _unique_labels(runs)
    return Collection(root=root, runs=runs, problems=problems)


def _link_recoveries(prunes: list[Artifact], recovers: list[Artifact],
                     prune_by_dir: dict[Path, Artifact]) -> dict[int, Optional[Artifact]]:
    """Recoveries → prunings: the pruning whose directory a recovery names (index of the recovery → pruning, or
    None); a lone unlinked recovery and a lone unlinked pruning are paired."""
    link = {index: _recovered_from(recover, prune_by_dir) for index, recover in enumerate(recovers)}
    unlinked_recovers = [i for i, p in link.items() if p is None]
    linked_prunes = {id(p) for p in link.values() if p is not None}
    unlinked_prunes = [p for p in prunes if id(p) not in linked_prunes]
    if len(unlinked_recovers) == 1 and len(unlinked_prunes) == 1:
        link[unlinked_recovers[0]] = unlinked_prunes[0]
    return link


def _recovered_from(recover: Artifact, prune_by_dir: dict[Path, Artifact]) -> Optional[Artifact]:
    """The pruning whose directory the recovery names (`model`, else `pruned`, else `source`), else None."""
    for key in ("model", "pruned", "source"):
        for base in (Path.cwd(), recover.directory):
            resolved = _resolve(recover.data.get(key), base)
            if resolved is not None and resolved in prune_by_dir:
                return prune_by_dir[resolved]
    return None


def _pruning_runs(root: Path, prunes: list[Artifact], recovers: list[Artifact],
                  link: dict[int, Optional[Artifact]]) -> list[Run]:
    """One run per recovery (with the pruning it links to), then one per pruning no recovery took."""
    runs: list[Run] = []
    for index, recover in enumerate(recovers):
        prune = link[index]
        runs.append(Run(label=_run_label(root, prune, recover), prune=prune, recover=recover))
    used_prunes = {id(r.prune) for r in runs if r.prune is not None}
    for prune in prunes:
        if id(prune) not in used_prunes:
            runs.append(Run(label=_label(root, prune.directory), prune=prune))
    return runs


def _evaluated_dense(model: Any) -> bool:
    """Whether a metrics file's `model` section is the dense model itself (its sha256 is the baseline's)."""
    return bool(isinstance(model, dict) and model.get("sha256") and model.get("sha256") == model.get("dense_sha256"))


def _place_metrics(artifact: Artifact, runs: list[Run], prune_by_dir: dict[Path, Artifact],
                   recover_by_dir: dict[Path, Artifact]) -> bool:
    """Metrics → the stage whose checkpoint they evaluated (the dense model's go to every run); False when no run
    holds that checkpoint."""
    model = artifact.data.get("model") or {}
    placed = False
    if _evaluated_dense(model):
        for run in runs or []:
            run.metrics.setdefault("dense", artifact)
        placed = bool(runs)
    for path in _metrics_model_dir(artifact):
        if placed:
            break
        if path in recover_by_dir:
            for run in runs:
                if run.recover is recover_by_dir[path]:
                    run.metrics["recovered"] = artifact
                    placed = True
        elif path in prune_by_dir:
            for run in runs:
                if run.prune is prune_by_dir[path]:
                    run.metrics["pruned"] = artifact
                    placed = True
    if not placed and isinstance(model, dict) and model.get("sha256"):
        for run in runs:  # the pruned model as the recovery loaded it
            if run.recover is not None and run.recover.data.get("model_sha256") == model["sha256"]:
                run.metrics["pruned"] = artifact
                placed = True
    return placed


def _add_leftover_metrics(root: Path, runs: list[Run], leftovers: list[Artifact]) -> None:
    """Metrics no run holds the checkpoint of: a lone one goes with a lone run's last stage; the others are runs
    of their own (the dense model's, or an evaluated model's)."""
    if len(runs) == 1 and len(leftovers) == 1:
        run = runs[0]
        stage = "recovered" if run.recover is not None else "pruned"
        if stage not in run.metrics:
            run.metrics[stage] = leftovers.pop()
    for artifact in leftovers:
        stage = "dense" if _evaluated_dense(artifact.data.get("model") or {}) else "evaluated"
        runs.append(Run(label=_label(root, artifact.directory), metrics={stage: artifact}))


def _run_label(root: Path, prune: Optional[Artifact], recover: Artifact) -> str:
    """The directory holding both stages (a sweep's run directory), else 'method target → recovery'."""
    if prune is None:
        return _label(root, recover.directory)
    a, b = prune.directory.resolve(), recover.directory.resolve()
    common = Path(os.path.commonpath([a, b]))
    if common != root and root in common.parents:
        return _label(root, common)
    target = number(prune.data.get("target_sparsity"))
    parts = [str(prune.data.get("method") or prune.directory.name)]
    if target is not None:
        parts.append(f"{target:.0%}")
    return " ".join(parts) + f" → {recover.data.get('method') or recover.directory.name}"


def _unique_labels(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.label, 0)
        seen[run.label] = count + 1
        if count:
            run.label = f"{run.label} ({count + 1})"
