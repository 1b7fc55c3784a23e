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
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

import tasks  # noqa: E402
from perp import sweep as plan  # noqa: E402
from perp.config import dump_params, load_params  # noqa: E402
from perp.pipeline import config_from_sections, lineage, read_json  # noqa: E402


def _run_on_pool(deployment: str, points: list[dict[str, Any]], workdir: str) -> list[dict[str, Any]]:
    """Every point as a whole `compress` run of `deployment` (each registers its own version). All are scheduled
    first (timeout=0), then awaited, so the pool runs them concurrently. `workdir` and the result storage must be
    shared by the pool's nodes (a shared volume, or S3 result storage)."""
    from prefect.deployments import run_deployment
    from prefect.flow_runs import wait_for_flow_run

    scheduled = [run_deployment(deployment, parameters={**point, "workdir": workdir}, timeout=0) for point in points]
    return [wait_for_flow_run(run.id).state.result() for run in scheduled]


def _run_locally(base: dict[str, Any], points: list[dict[str, Any]], workdir: str) -> list[dict[str, Any]]:
    """Every point's stages on the flow's thread pool: one calibration for the grid, one mask per prune config."""
    calibration = tasks.calibrate.submit(base["model"], base["data"]["calibration"], workdir, base)
    # Identical tasks submitted at once would both compute (nothing locks the cache between concurrent runs), so
    # the recovery methods of one (method, sparsity) share one submitted mask.
    masks: dict[str, Any] = {}
    for point in points:
        if plan.prune_key(point) not in masks:
            masks[plan.prune_key(point)] = tasks.mask.submit(point["model"], point["prune"], calibration, workdir,
                                                             point)
    futures = []
    for point in points:
        pruned = masks[plan.prune_key(point)]
        recovered = tasks.recover.submit(point["recover"], pruned, point["model"], point["data"], workdir, point)
        metrics = tasks.evaluate.submit(point["evaluate"], recovered, point["model"], point["prune"], workdir, point)
        futures.append((pruned, recovered, metrics))
    return [{"recovered": recovered.result(), "metrics": metrics.result(), "registered": None,
             "lineage": lineage(calibration.result(), pruned.result(), recovered.result())}
            for pruned, recovered, metrics in futures]


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
    """Locally, the points run on the flow's thread pool and the flow registers the best one; with `deployment`,
    each point is a run of that deployment, which registers its own version."""
    base_params = dump_params(config_from_sections(**(base or {})))
    judged_under = plan.check_request(objective, gate_stage, base_params["register"]["stages"])
    points = plan.grid(base_params, methods, sparsities, recover_methods)

    results = _run_on_pool(deployment, points, workdir) if deployment else _run_locally(base_params, points, workdir)
    rows = [plan.result_row(index, point, read_json(Path(result["metrics"]["uri"])), result["metrics"]["uri"],
                            judged_under)
            for index, (point, result) in enumerate(zip(points, results))]
    # The results table is published before anything is registered: a failed registration keeps it.
    create_table_artifact(rows, key="perp-sweep-results", description="perp sweep: every grid point")
    front = plan.front(rows)
    best = plan.best(rows, objective, filter_by_gates=gate_stage is not None)

    registered = results[best["point"]]["registered"] if best is not None else None
    if best is not None and register_best and not deployment:
        point, result = points[best["point"]], results[best["point"]]
        registered = tasks.register(point["register"], result["recovered"], result["metrics"], point,
                                    result["lineage"])
    choice = plan.choice_line(best, objective, judged_under, filter_by_gates=gate_stage is not None)
    create_markdown_artifact(plan.summary_markdown(choice, front), key="perp-sweep-summary",
                             description="perp sweep summary")
    print(choice)
    return {"rows": rows, "front": front, "best": best, "registered": registered}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[])
    parser.add_argument("--methods", default="wanda")
    parser.add_argument("--sparsities", default="0.5")
    parser.add_argument("--recover", default="norm")
    parser.add_argument("--objective", default="ppl_ratio", choices=sorted(plan.OBJECTIVES))
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
