"""The `compress` flow: calibrate → mask → recover → evaluate → register, one Prefect task per stage.

Its parameters are the sections of params.yaml. The whole config is validated before the first task runs, so a
bad value fails the flow with the config error and writes nothing.

    python flows/compress.py [--params params.yaml] [-S prune.sparsity=0.6 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

# Run as a script or as a deployment entrypoint, the repo root must be importable for `tasks`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow  # noqa: E402

import tasks  # noqa: E402
from perp.config import dump_params, load_params  # noqa: E402
from perp.pipeline import config_from_sections, lineage  # noqa: E402


@flow(name="compress", log_prints=True)
def compress(
    model: Optional[dict[str, Any]] = None,
    data: Optional[dict[str, Any]] = None,
    prune: Optional[dict[str, Any]] = None,
    recover: Optional[dict[str, Any]] = None,
    evaluate: Optional[dict[str, Any]] = None,
    register: Optional[dict[str, Any]] = None,
    workdir: str = "runs",
) -> dict[str, Any]:
    config = config_from_sections(model=model, data=data, prune=prune, recover=recover, evaluate=evaluate,
                                  register=register)
    params = dump_params(config)
    calibration = tasks.calibrate(params["model"], params["data"]["calibration"], workdir, params)
    pruned = tasks.mask(params["model"], params["prune"], calibration, workdir, params)
    recovered = tasks.recover(params["recover"], pruned, params["model"], params["data"], workdir, params)
    metrics = tasks.evaluate(params["evaluate"], recovered, params["model"], params["prune"], workdir, params)
    manifest = tasks.register(params["register"], recovered, metrics, params,
                              lineage(calibration, pruned, recovered))
    print(f"registered {manifest.get('name')} v{manifest.get('version')}; metrics {metrics['uri']}")
    return {"calibration": calibration, "pruned": pruned, "recovered": recovered, "metrics": metrics,
            "registered": manifest}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[])
    parser.add_argument("--workdir", default="runs")
    args = parser.parse_args(argv)
    sections = dump_params(load_params(args.params, args.sets))
    compress(**sections, workdir=args.workdir)


if __name__ == "__main__":
    main()
