"""The `promote` flow: gated promotion of a registered version, with a reason, recorded in the audit trail.

    python flows/promote.py NAME VERSION --to prod --reason "passed review" [--force] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from perp.config import dump_params, load_params  # noqa: E402
from tasks.stages import is_store_error  # noqa: E402
from perp.pipeline import config_from_sections  # noqa: E402


@task(name="promote", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_condition_fn=is_store_error)
def promote_task(store: str, name: str, version: int, to_stage: str, reason: str, force: bool,
                 gates: dict[str, Any], stages: list[str]) -> dict[str, Any]:
    from perp.registry import promote

    config = config_from_sections(register={"store": store, "name": name, "stages": stages, "gates": gates})
    event = promote(store, name, version, to_stage, reason, force=force, gates=config.register.gates,
                    stages=config.register.stages)
    forced = " (forced)" if force else ""
    create_markdown_artifact(f"### Promoted{forced}\n\n**{name}** v{version} → **{to_stage}**\n\nreason: {reason}",
                             key="perp-promote", description="perp promotion")
    return event


@flow(name="promote", log_prints=True)
def promote(name: str, version: int, to_stage: str, reason: str, force: bool = False,
            register: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    config = config_from_sections(register=register)
    section = dump_params(config)["register"]
    return promote_task(section["store"], name, version, to_stage, reason, force, section["gates"],
                        section["stages"])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("version", type=int)
    parser.add_argument("--to", dest="to_stage", required=True)
    parser.add_argument("--reason", required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    register = dump_params(load_params(args.params))["register"]
    promote(args.name, args.version, args.to_stage, args.reason, args.force, register)


if __name__ == "__main__":
    main()
