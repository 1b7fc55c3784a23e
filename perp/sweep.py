"""A sweep's grid and its verdict: every point's params, its results row, the sparsity × quality front and the best
point by a declared objective. Pure: the `sweep` flow runs the points; this module only plans and judges them."""

from __future__ import annotations

import itertools
import json
from typing import Any, Optional

from perp.config import dump_params
from perp.errors import ConfigError
from perp.pipeline import config_from_sections
from perp.registry.gates import evaluate_gates
from perp.report.figures import pareto_front

# objective name → (column of the results table, direction)
OBJECTIVES = {
    "ppl_ratio": ("ppl_ratio", "min"),
    "zeroshot_drop": ("zeroshot_drop_points", "min"),
    "sparsity": ("sparsity", "max"),
}


def check_request(objective: str, gate_stage: Optional[str], stages: list[str]) -> str:
    """The stage whose gates every point is judged under (`gate_stage`, else the last stage); bad names fail here,
    before anything runs."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective '{objective}' is unknown (allowed: {', '.join(OBJECTIVES)})")
    stage = gate_stage or stages[-1]
    if stage not in stages:
        raise ConfigError(f"gate_stage '{stage}' is not a stage (allowed: {', '.join(stages)})")
    return stage


def grid(base: dict[str, Any], methods: list[str], sparsities: list[float],
         recover_methods: list[str]) -> list[dict[str, Any]]:
    """Every point's full, validated params (invalid combinations fail here, before anything runs)."""
    points = []
    for method, sparsity, recover_method in itertools.product(methods, sparsities, recover_methods):
        sections = {**base, "prune": {**base["prune"], "method": method, "sparsity": sparsity},
                    "recover": {**base["recover"], "method": recover_method}}
        points.append(dump_params(config_from_sections(**sections)))
    return points


def prune_key(point: dict[str, Any]) -> str:
    """Points with equal keys share one mask stage."""
    return json.dumps(point["prune"], sort_keys=True)


def _metric(metrics: dict[str, Any], name: str) -> Optional[float]:
    gates = metrics.get("gates")
    value = gates.get(name) if isinstance(gates, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def result_row(index: int, point: dict[str, Any], metrics: dict[str, Any], metrics_uri: str,
               gate_stage: str) -> dict[str, Any]:
    """One point's line of the results table, with its verdict under `gate_stage`'s gates."""
    register = config_from_sections(register=point["register"]).register
    verdict = evaluate_gates(gate_stage, register.stages, register.gates.get(gate_stage), metrics,
                             stages_ever=set(register.stages))
    return {
        "point": index, "method": point["prune"]["method"], "pattern": point["prune"]["pattern"],
        "target_sparsity": point["prune"]["sparsity"], "recover": point["recover"]["method"],
        "sparsity": _metric(metrics, "sparsity"), "ppl_ratio": _metric(metrics, "ppl_ratio"),
        "zeroshot_drop_points": _metric(metrics, "zeroshot_drop_points"),
        "passes_gates": verdict["passed"], "failed_gates": ",".join(verdict["failed"]),
        "metrics": metrics_uri,
    }


def front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured rows not dominated in (higher sparsity, lower perplexity ratio), by sparsity."""
    measured = [row for row in rows if row["sparsity"] is not None and row["ppl_ratio"] is not None]
    kept = set(pareto_front([(row["sparsity"], row["ppl_ratio"]) for row in measured]))
    return sorted((row for row in measured if (row["sparsity"], row["ppl_ratio"]) in kept),
                  key=lambda row: row["sparsity"])


def best(rows: list[dict[str, Any]], objective: str, filter_by_gates: bool) -> Optional[dict[str, Any]]:
    """The best row by `objective` among those measured on it (and passing the gates, when filtering)."""
    column, direction = OBJECTIVES[objective]
    eligible = [row for row in rows if (row["passes_gates"] or not filter_by_gates) and row[column] is not None]
    if not eligible:
        return None
    return (min if direction == "min" else max)(eligible, key=lambda row: row[column])


def choice_line(chosen: Optional[dict[str, Any]], objective: str, gate_stage: str, filter_by_gates: bool) -> str:
    if chosen is not None:
        under = f" under the '{gate_stage}' gates" if filter_by_gates else ""
        return (f"best by {objective} ({OBJECTIVES[objective][1]}){under}: point {chosen['point']} "
                f"({chosen['method']} {chosen['target_sparsity']} + {chosen['recover']})")
    return f"no point passes the '{gate_stage}' gates" if filter_by_gates else "no point was measured"


def summary_markdown(choice: str, front_rows: list[dict[str, Any]]) -> str:
    lines = "\n".join(f"| {r['sparsity']:.3f} | {r['ppl_ratio']:.3f} | {r['method']} | {r['recover']} |"
                      for r in front_rows)
    return (f"### Sweep\n\n{choice}\n\n#### Sparsity × quality front\n\n| sparsity | ppl ratio | method | recovery |\n"
            f"|---|---|---|---|\n{lines}\n")
