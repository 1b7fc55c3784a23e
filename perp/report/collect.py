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

    # ---- recoveries → prunings
    link: dict[int, Optional[Artifact]] = {}
    for index, recover in enumerate(recovers):
        source = None
        for key in ("model", "pruned", "source"):
            for base in (Path.cwd(), recover.directory):
                resolved = _resolve(recover.data.get(key), base)
                if resolved is not None and resolved in prune_by_dir:
                    source = prune_by_dir[resolved]
                    break
            if source is not None:
                break
        link[index] = source
    unlinked_recovers = [i for i, p in link.items() if p is None]
    linked_prunes = {id(p) for p in link.values() if p is not None}
    unlinked_prunes = [p for p in prunes if id(p) not in linked_prunes]
    if len(unlinked_recovers) == 1 and len(unlinked_prunes) == 1:
        link[unlinked_recovers[0]] = unlinked_prunes[0]

    runs: list[Run] = []
    for index, recover in enumerate(recovers):
        prune = link[index]
        runs.append(Run(label=_run_label(root, prune, recover), prune=prune, recover=recover))
    used_prunes = {id(r.prune) for r in runs if r.prune is not None}
    for prune in prunes:
        if id(prune) not in used_prunes:
            runs.append(Run(label=_label(root, prune.directory), prune=prune))

    # ---- metrics → the stage whose checkpoint they evaluated
    leftovers: list[Artifact] = []
    for artifact in metrics:
        model = artifact.data.get("model") or {}
        placed = False
        if isinstance(model, dict) and model.get("sha256") and model.get("sha256") == model.get("dense_sha256"):
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
        if not placed:
            leftovers.append(artifact)
    if len(runs) == 1 and len(leftovers) == 1:
        run = runs[0]
        stage = "recovered" if run.recover is not None else "pruned"
        if stage not in run.metrics:
            run.metrics[stage] = leftovers.pop()
    for artifact in leftovers:
        model = artifact.data.get("model") or {}
        is_dense = isinstance(model, dict) and model.get("sha256") and model.get("sha256") == model.get("dense_sha256")
        runs.append(Run(label=_label(root, artifact.directory), metrics={"dense" if is_dense else "evaluated": artifact}))
    _unique_labels(runs)
    return Collection(root=root, runs=runs, problems=problems)


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
