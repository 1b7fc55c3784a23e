"""One Prefect task per stage. Inputs and outputs are config sections, URIs and sha256s — never model objects.

Caching is INPUTS + TASK_SOURCE with persisted results: the same inputs recompute nothing, and since each task's
key holds only the sections it depends on, changing one parameter recomputes only the stages downstream of it.
`register` alone is never cached: it asks the store every time (and writes nothing when the version exists).
`OutputsPresent` adds what the inputs cannot show: the identity of the work directory (a wiped or new one
recomputes everything instead of returning references to outputs that are gone), whether each upstream output
still exists (a task whose input was deleted runs, and fails with a clear error, rather than hitting the cache).
A task's own output cannot be part of its key: the key is computed before the task runs, when a first run's
output does not exist yet either.
The run's full params travel along (`params`, left out of the key) only so that reports record them.
Store I/O failures are retried with exponential backoff; bad input is not retried.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from prefect.tasks import exponential_backoff

from perp import pipeline
from perp.errors import PerpError



@dataclass
class OutputsPresent(CachePolicy):
    """Cache key part: the work directory's identity and which upstream outputs still exist."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        state: dict[str, Any] = {}
        workdir = inputs.get("workdir")
        if isinstance(workdir, str):
            state["workdir"] = pipeline.workdir_identity(workdir)
        for name, value in inputs.items():
            if pipeline.is_ref(value):
                state[name] = pipeline.ref_present(value)
        return hash_objects(state)


CACHE_POLICY = (INPUTS - "params") + TASK_SOURCE + OutputsPresent()


#: OS errors that a retry can outlast (network hiccups, interrupted calls). A full disk, a quota, a read-only or
#: permission-denied path fails the same way every time: retrying would only repeat hours of compute.
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                              errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                              errno.ENETRESET, errno.EPIPE})


def is_store_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O (an unreachable store or endpoint, lost races, network errors); never a user error
    such as a bad config, a missing or corrupt object, nor a full disk."""
    from perp.io.s3 import S3Unreachable
    from perp.registry.events import RegistryConflict
    from perp.store import StoreUnreachable

    try:
        state.result()
    except (StoreUnreachable, S3Unreachable, RegistryConflict):
        return True
    except PerpError:
        return False
    except (TimeoutError, ConnectionError):
        return True
    except OSError as error:
        return error.errno in TRANSIENT_ERRNOS
    except Exception as error:  # botocore errors arrive unwrapped from boto3 calls
        return type(error).__module__.startswith(("botocore", "boto3", "urllib3"))
    return False


STAGE_OPTIONS: dict[str, Any] = {
    "cache_policy": CACHE_POLICY,
    "persist_result": True,
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": is_store_error,
}


def _publish(stage: str, rows: dict[str, Any], summary: str) -> None:
    flat = [{"metric": key, "value": value} for key, value in rows.items() if not isinstance(value, (dict, list))]
    create_table_artifact(flat, key=f"perp-{stage}", description=f"perp {stage} stage")
    create_markdown_artifact(summary, key=f"perp-{stage}-summary", description=f"perp {stage} summary")


@task(name="calibrate", **STAGE_OPTIONS)
def calibrate(model: dict[str, Any], calibration: dict[str, Any], workdir: str,
              params: dict[str, Any] | None = None) -> dict[str, Any]:
    ref = pipeline.calibrate_stage(model, calibration, workdir, params)
    _publish("calibrate", {"windows": calibration["nsamples"], "seqlen": calibration["seqlen"],
                           "tokens_sha256": ref["tokens_sha256"]},
             f"### Calibration\n\n`{calibration['source']}` → `{ref['uri']}`\n\ntokens sha256 `{ref['tokens_sha256']}`")
    return ref


@task(name="mask", **STAGE_OPTIONS)
def mask(model: dict[str, Any], prune: dict[str, Any], calibration: dict[str, Any], workdir: str,
         params: dict[str, Any] | None = None) -> dict[str, Any]:
    ref = pipeline.mask_stage(model, prune, calibration, workdir, params)
    report = pipeline.read_json(Path(ref["report"]))
    _publish("mask", {"method": prune["method"], "pattern": prune["pattern"],
                      "target_sparsity": report.get("target_sparsity"),
                      "achieved_sparsity": report.get("achieved_sparsity")},
             f"### Mask\n\n{prune['method']} {prune['pattern']} → `{ref['uri']}`\n\nreport: `{ref['report']}`")
    return ref


@task(name="recover", **STAGE_OPTIONS)
def recover(recover: dict[str, Any], pruned: dict[str, Any], dense_model: dict[str, Any], data: dict[str, Any],
            workdir: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    ref = pipeline.recover_stage(recover, pruned, dense_model, data, workdir, params)
    report = pipeline.read_json(Path(ref["report"]))
    _publish("recover", {key: report.get(key) for key in ("method", "mode", "trainable_params",
                                                          "trainable_fraction", "ppl_before", "ppl_after")},
             f"### Recovery\n\n{recover['method']} ({recover['mode']}) → `{ref['uri']}`\n\nreport: `{ref['report']}`")
    return ref


@task(name="evaluate", **STAGE_OPTIONS)
def evaluate(evaluate: dict[str, Any], candidate: dict[str, Any], dense_model: dict[str, Any],
             prune: dict[str, Any], workdir: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    ref = pipeline.evaluate_stage(evaluate, candidate, dense_model, prune, workdir, params)
    metrics = pipeline.read_json(Path(ref["uri"]))
    gates = metrics.get("gates", {})
    _publish("evaluate", {"sparsity": metrics.get("sparsity"), **{f"gate_{k}": v for k, v in gates.items()}},
             f"### Evaluation\n\nmetrics: `{ref['uri']}`")
    return ref


# Never served from Prefect's cache: the store, not the work directory, says whether a version still holds this
# model (it may have been deregistered, or the store wiped or moved). `register_stage` is idempotent, so a re-run
# with nothing new returns the existing version ("reused") without writing.
@task(name="register", **{**STAGE_OPTIONS, "cache_policy": NO_CACHE, "persist_result": False})
def register(register: dict[str, Any], candidate: dict[str, Any], metrics: dict[str, Any], params: dict[str, Any],
             lineage: dict[str, Any]) -> dict[str, Any]:
    from prefect.runtime import flow_run

    manifest = pipeline.register_stage(register, candidate, metrics, params, lineage,
                                       flow_run_id=str(flow_run.id) if flow_run.id else None)
    name, version, reused = manifest.get("name"), manifest.get("version"), bool(manifest.get("reused"))
    note = " (already registered with this model, metrics and lineage: reused)" if reused else ""
    _publish("register", {"name": name, "version": version, "reused": reused, "store": register["store"]},
             f"### Registered\n\n**{name}** version **{version}** in `{register['store']}`{note}")
    return manifest
