"""The `sweep` flow: pruning methods × sparsities × recovery methods, fanned out as concurrent runs.

Each grid point is the `compress` chain without registration. Points share every stage whose inputs are equal
(one calibration for the whole grid; one mask per method × sparsity), because the stage tasks are cached by
their inputs. The flow publishes a results table and the sparsity × quality front and picks the best point by a
declared objective, among the points that pass the gates of `gate_stage` when one is given (every point's verdict
under the last stage's gates is in the table either way; with the default evaluation, which measures no zero-shot
accuracy, prod's zero-shot gate would fail every point).

Locally the points run on the flow's thread pool and the flow registers the best one. With `deployment` set
(e.g. "compress/nightly"), each point is instead a run of that deployment, so the grid fans out over the GPU work
pool; every such run registers its own version, and the flow reports which one is best.

    python flows/sweep.py --methods wanda,sparsegpt --sparsities 0.5,0.6 --recover norm,masklora
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

import tasks  # noqa: E402
from perp.config import dump_params, load_params  # noqa: E402
from perp.pipeline import config_from_sections, lineage, read_json  # noqa: E402
from perp.registry.gates import evaluate_gates  # noqa: E402

# objective name → (column of the results table, direction)
OBJECTIVES = {
    "ppl_ratio": ("ppl_ratio", "min"),
    "zeroshot_drop": ("zeroshot_drop_points", "min"),
    "sparsity": ("sparsity", "max"),
}


def _metric(metrics: dict[str, Any], path: tuple[str, ...]) -> Optional[float]:
    node: Any = metrics
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) else None


def grid(base: dict[str, Any], methods: list[str], sparsities: list[float], recover_methods: list[str]) -> list[dict[str, Any]]:
    """Every point's full, validated params (invalid combinations fail here, before anything runs)."""
    points = []
    for method, sparsity, recover_method in itertools.product(methods, sparsities, recover_methods):
        sections = {**base, "prune": {**base["prune"], "method": method, "sparsity": sparsity},
                    "recover": {**base["recover"], "method": recover_method}}
        points.append(dump_params(config_from_sections(**sections)))
    return points


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated in (higher sparsity, lower perplexity ratio)."""
    front = []
    for row in rows:
        dominated = any(other is not row and other["sparsity"] >= row["sparsity"]
                        and other["ppl_ratio"] <= row["ppl_ratio"]
                        and (other["sparsity"], other["ppl_ratio"]) != (row["sparsity"], row["ppl_ratio"])
                        for other in rows)
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda row: row["sparsity"])


def _run_point_locally(params: dict[str, Any], pruned: Any, workdir: str) -> tuple[Any, Any, Any]:
    recovered = tasks.recover.submit(params["recover"], pruned, params["model"], params["data"], workdir, params)
    metrics = tasks.evaluate.submit(params["evaluate"], recovered, params["model"], params["prune"], workdir,
                                    params)
    return pruned, recovered, metrics


@flow(name="sweep", log_prints=True)
def sweep(
    methods: list[str],
    sparsities: list[float],
    recover_methods: list[str],
    base: Optional[dict[str, Any]] = None,
    objective: str = "ppl_ratio",
    gate_stage: Optional[str] = None,
    register_best: bool = True,
    deployment: Optional[str] = None,
    workdir: str = "runs",
) -> dict[str, Any]:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective '{objective}' is unknown (allowed: {', '.join(OBJECTIVES)})")
    base_params = dump_params(config_from_sections(**(base or {})))
    stages = base_params["register"]["stages"]
    filter_by_gates = gate_stage is not None
    gate_stage = gate_stage or stages[-1]  # shown for every point; it filters only when asked for
    if gate_stage not in stages:
        raise ValueError(f"gate_stage '{gate_stage}' is not a stage (allowed: {', '.join(stages)})")
    points = grid(base_params, methods, sparsities, recover_methods)

    if deployment:
        from prefect.deployments import run_deployment
        from prefect.flow_runs import wait_for_flow_run

        # Every point is a whole `compress` run on the pool (which registers its own version). All are
        # scheduled first (timeout=0), then awaited, so the pool runs them concurrently. `workdir` and the result
        # storage must be shared by the pool's nodes (a shared volume, or S3 result storage).
        scheduled = [run_deployment(deployment, parameters={**point, "workdir": workdir}, timeout=0)
                     for point in points]
        results = [wait_for_flow_run(run.id).state.result() for run in scheduled]
        metrics_refs = [result["metrics"] for result in results]
        lineages = [None] * len(points)
        candidates = [result["recovered"] for result in results]
        registered_by_point = [result["registered"] for result in results]
    else:
        registered_by_point = []
        calibration = tasks.calibrate.submit(base_params["model"], base_params["data"]["calibration"], workdir,
                                             base_params)
        # One mask per (method, sparsity), shared by the recovery methods: identical tasks submitted at once would
        # both compute, since nothing locks the cache between concurrent runs.
        masks: dict[str, Any] = {}
        for point in points:
            key = json.dumps(point["prune"], sort_keys=True)
            if key not in masks:
                masks[key] = tasks.mask.submit(point["model"], point["prune"], calibration, workdir, point)
        futures = [_run_point_locally(point, masks[json.dumps(point["prune"], sort_keys=True)], workdir)
                   for point in points]
        calibration_ref = calibration.result()
        candidates, metrics_refs, lineages = [], [], []
        for pruned, recovered, metrics in futures:
            candidates.append(recovered.result())
            metrics_refs.append(metrics.result())
            lineages.append(lineage(calibration_ref, pruned.result(), recovered.result()))

    gates = config_from_sections(register=base_params["register"]).register.gates.get(gate_stage)
    rows = []
    for index, (point, ref) in enumerate(zip(points, metrics_refs)):
        metrics = read_json(Path(ref["uri"]))
        verdict = evaluate_gates(gate_stage, stages, gates, metrics, stages_ever=set(stages))
        rows.append({
            "point": index, "method": point["prune"]["method"], "pattern": point["prune"]["pattern"],
            "target_sparsity": point["prune"]["sparsity"], "recover": point["recover"]["method"],
            "sparsity": _metric(metrics, ("gates", "sparsity")), "ppl_ratio": _metric(metrics, ("gates", "ppl_ratio")),
            "zeroshot_drop_points": _metric(metrics, ("gates", "zeroshot_drop_points")),
            "passes_gates": verdict["passed"], "failed_gates": ",".join(verdict["failed"]),
            "metrics": ref["uri"],
        })

    create_table_artifact(rows, key="perp-sweep-results", description="perp sweep: every grid point")
    measured = [row for row in rows if row["sparsity"] is not None and row["ppl_ratio"] is not None]
    front = pareto_front(measured)
    front_lines = "\n".join(f"| {r['sparsity']:.3f} | {r['ppl_ratio']:.3f} | {r['method']} | {r['recover']} |"
                            for r in front)
    column, direction = OBJECTIVES[objective]
    eligible = [row for row in rows if (row["passes_gates"] or not filter_by_gates) and row[column] is not None]
    best = (min if direction == "min" else max)(eligible, key=lambda row: row[column]) if eligible else None

    registered = registered_by_point[best["point"]] if (deployment and best is not None) else None
    if best is not None and register_best and not deployment:
        point = points[best["point"]]
        params_ref = candidates[best["point"]]
        registered = tasks.register(point["register"], params_ref, metrics_refs[best["point"]], point,
                                    lineages[best["point"]] or {})
    under = f" under the '{gate_stage}' gates" if filter_by_gates else ""
    choice = (f"best by {objective} ({direction}){under}: point {best['point']} "
              f"({best['method']} {best['target_sparsity']} + {best['recover']})" if best else
              f"no point passes the '{gate_stage}' gates" if filter_by_gates else "no point was measured")
    create_markdown_artifact(
        f"### Sweep\n\n{choice}\n\n#### Sparsity × quality front\n\n| sparsity | ppl ratio | method | recovery |\n"
        f"|---|---|---|---|\n{front_lines}\n", key="perp-sweep-summary", description="perp sweep summary")
    print(choice)
    return {"rows": rows, "front": front, "best": best, "registered": registered}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[])
    parser.add_argument("--methods", default="wanda")
    parser.add_argument("--sparsities", default="0.5")
    parser.add_argument("--recover", default="norm")
    parser.add_argument("--objective", default="ppl_ratio", choices=sorted(OBJECTIVES))
    parser.add_argument("--gate-stage", default=None, help="only points passing this stage's gates are eligible")
    parser.add_argument("--deployment", default=None)
    parser.add_argument("--workdir", default="runs")
    args = parser.parse_args(argv)
    base = dump_params(load_params(args.params, args.sets))
    sweep(methods=args.methods.split(","), sparsities=[float(s) for s in args.sparsities.split(",")],
          recover_methods=args.recover.split(","), base=base, objective=args.objective, gate_stage=args.gate_stage,
          deployment=args.deployment, workdir=args.workdir)


if __name__ == "__main__":
    main()
