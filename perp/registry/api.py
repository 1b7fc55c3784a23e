"""Model registry operations: register, find, promote, rollback, deregister, list, show, history, verify, pull, gc.

A version is immutable: ``register`` uploads every file of the checkpoint as a content-addressed blob (each
``*.safetensors`` in the compact perp-sparse format, rebuilt byte for byte on pull), then a manifest blob, and
only then appends the ``register`` event that makes the version visible. A registration killed at any point
before that event leaves only unreferenced blobs: no visible version, no gap in the version numbers. ``gc``
deletes such orphans once they are older than a grace period (see `gc` for what keeps it safe alongside writers).

Manifest fields: ``files`` (every file's sha256 and size, as pulled), ``storage`` (how each is stored),
``metrics`` (metrics.json), ``params``, ``lineage`` (base_model {source, sha256}, calibration_sha256,
training_data_sha256, prune, recover), ``code`` (perp version, git commit, dirty flag), ``dvc_outs``,
``prefect_flow_run_id``, ``who`` (user, host), ``when`` (UTC), ``extra``. Secrets are scrubbed from every
user-supplied field (`perp.registry.provenance.scrub_secrets`).

Every function takes the store as a URI (or an open `Store`). Bad requests are `RegistryError`s raised before
anything is written. See `perp.registry.events` for the log and its concurrency, `perp.registry.gates` for the
metrics.json shape and the gates.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from perp.config import GatesConfig, RegisterConfig
from perp.layout import METRICS_FILE
from perp.registry.events import (
    ModelState,
    RegistryIntegrityError,
    append_event,
    canonical,
    event_key,
    load_state,
    models_prefix,
    pointer_key,
    read_pointer,
    scan_log,
    stages_prefix,
)
from perp.registry.gates import describe_failures, evaluate_gates
from perp.registry.names import (
    LATEST,
    RegistryError,
    parse_ref,
    validate_name,
    validate_stage,
    validate_stages,
    validate_version,
)
from perp.registry.provenance import (
    code_version,
    dvc_outs,
    jsonable,
    prefect_flow_run_id,
    scrub_secrets,
    utc_now,
    who,
)
from perp.store import Store, StoreError, StoreIntegrityError, StoreNotFound, blob_key, open_store
from perp.store.base import validate_sha256

MANIFEST_SCHEMA = "perp.registry.manifest/1"
PULL_RECORD = ".perp-registry.json"
ENCODING_RAW = "raw"
ENCODING_SPARSE = "perp-sparse/1"
ENCODINGS = (ENCODING_RAW, ENCODING_SPARSE)
MAX_REASON = 2000
GC_GRACE_SECONDS = 86400.0
StoreLike = Union[str, Store]


class GateRefused(RegistryError):
    """A promotion failed its gates; `evaluation` holds the evidence."""

    def __init__(self, message: str, evaluation: dict[str, Any]) -> None:
        super().__init__(message)
        self.evaluation = evaluation


# --------------------------------------------------------------------------------------------- helpers


def _store(store: StoreLike, *, create: bool = False) -> Store:
    """Open `store`. Only a registration (`create`) may start a new store: for every other request a local store
    root that does not exist is an error naming it, not an empty registry (a typo'd --store would read as one)."""
    opened = store if isinstance(store, Store) else open_store(store)
    if not create and not opened.exists():
        raise RegistryError(f"store '{opened.describe()}' does not exist (check --store / register.store; "
                            "only registering a version creates a store)")
    return opened


def _stage_config(stages: Optional[list[str]],
                  gates: Optional[Mapping[str, Any]]) -> tuple[list[str], dict[str, GatesConfig]]:
    """Stages and gates as given, else the `register` defaults of params.yaml's schema."""
    defaults = RegisterConfig()
    stages = validate_stages(list(stages) if stages is not None else list(defaults.stages))
    raw = dict(gates) if gates is not None else dict(defaults.gates)
    resolved: dict[str, GatesConfig] = {}
    for stage, config in raw.items():
        if stage not in stages:
            raise RegistryError(f"gates name unknown stage '{stage}' (allowed: {', '.join(stages)})")
        if config is None:
            continue
        try:
            resolved[stage] = config if isinstance(config, GatesConfig) else GatesConfig.model_validate(config)
        except Exception as error:
            raise RegistryError(f"gates.{stage}: {str(error).splitlines()[0]}") from None
    return stages, resolved


def _reason(reason: Optional[str], required: Optional[str] = None) -> str:
    text = (reason or "").strip()
    if required and not text:
        raise RegistryError(required)
    if len(text) > MAX_REASON:
        raise RegistryError(f"reason is too long ({len(text)} > {MAX_REASON} characters)")
    return text


def _dict_or_none(value: Any, what: str) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RegistryError(f"{what} must be a mapping, got {type(value).__name__}")
    return scrub_secrets(jsonable(dict(value)))


def _model_files(model_dir: Path) -> list[tuple[str, Path]]:
    files = []
    for path in sorted(model_dir.rglob("*")):
        rel_parts = path.relative_to(model_dir).parts
        if any(part.startswith(".") for part in rel_parts) or not path.is_file():
            continue
        rel = "/".join(rel_parts)
        if "\\" in rel or any(ord(c) < 32 for c in rel) or len(rel) > 512:
            raise RegistryError(f"'{model_dir / rel}': file name not supported by the registry")
        files.append((rel, path))
    return files


def _safe_relpath(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise RegistryIntegrityError(f"manifest lists an unsafe path '{rel}'")
    return rel


def _require_model(state: ModelState, store: Store, name: str) -> None:
    if not state.versions:
        raise RegistryError(f"model '{name}' not found in {store.describe()}")


def _load_manifest(store: Store, name: str, state: ModelState, version: int) -> dict[str, Any]:
    record = state.require_version(version)
    key = blob_key(record.manifest_sha256)
    try:
        manifest = json.loads(store.get_blob_bytes(record.manifest_sha256))
    except StoreNotFound:
        raise RegistryIntegrityError(f"manifest of '{name}' v{version} ({key}) is missing") from None
    except StoreIntegrityError:
        raise RegistryIntegrityError(f"manifest of '{name}' v{version} ({key}) was altered") from None
    if manifest.get("name") != name:
        raise RegistryIntegrityError(f"manifest of '{name}' v{version} ({key}) belongs to '{manifest.get('name')}'")
    return manifest


def _event_summary(event: dict[str, Any]) -> dict[str, Any]:
    return {"seq": event["seq"], "hash": event["hash"], "when": event["when"], "who": event["who"]}


# --------------------------------------------------------------------------------------------- register


def _check_metrics_measured_this_model(metrics: Optional[dict[str, Any]], model_dir: Path) -> None:
    """Gate evidence must belong to the files registered: metrics with gate figures name the checkpoint hash they
    were measured on (`perp evaluate` writes it), and it is these files'. Metrics without gate figures (notes, a
    dense baseline) need not."""
    from perp.models.loading import model_content_hash

    measured = (metrics or {}).get("model", {}).get("sha256") if isinstance((metrics or {}).get("model"), dict) else None
    if measured is None:
        if (metrics or {}).get("gates"):
            raise RegistryError("metrics have gate figures but do not name the model they were measured on "
                                "(model.sha256); register the metrics.json that perp evaluate wrote for this model")
        return
    actual = model_content_hash(model_dir)
    if measured != actual:
        raise RegistryError(f"metrics.json was measured on another model (sha256 {measured[:12]}…) than "
                            f"'{model_dir}' ({actual[:12]}…); re-run perp evaluate on it")


def register_version(store_uri: StoreLike, name: str, model_dir: Path, metrics: Optional[dict] = None,
                     params: Optional[dict] = None, lineage: Optional[dict] = None, extra: Optional[dict] = None,
                     *, compact: bool = True, reuse: bool = False, flow_run_id: Optional[str] = None) -> dict[str, Any]:
    """Register the checkpoint in `model_dir` as the next version of `name`; returns its manifest + version.

    `metrics` defaults to `model_dir/metrics.json` when present. With `compact`, safetensors files are stored in
    the perp-sparse format whenever that is smaller; pulls rebuild them byte for byte.

    `flow_run_id` is the orchestrator run to record (the Prefect task passes its flow run's id).

    With `reuse`, an active version recording exactly the same files, metrics, params, lineage and extra is
    returned instead (`"reused": true`) and nothing is written: one found when the log is read (before any
    upload), or one another writer registered while this one uploaded (two identical runs racing each other, a
    retried flow whose first attempt still runs).
    """
    from perp.io.hashing import cached_sha256
    from perp.io.cache import scratch_dir
    from perp.store.sparse_format import pack_file

    name = validate_name(name)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RegistryError(f"model directory '{model_dir}' does not exist")
    files = _model_files(model_dir)
    if not files:
        raise RegistryError(f"model directory '{model_dir}' holds no files")
    if metrics is None and (model_dir / METRICS_FILE).is_file():
        try:
            metrics = json.loads((model_dir / METRICS_FILE).read_text())
        except ValueError:
            raise RegistryError(f"'{model_dir / 'metrics.json'}' is not valid JSON") from None
    metrics_d, params_d = _dict_or_none(metrics, "metrics"), _dict_or_none(params, "params")
    _check_metrics_measured_this_model(metrics_d, model_dir)
    lineage_d, extra_d = _dict_or_none(lineage, "lineage"), _dict_or_none(extra, "extra")
    store = _store(store_uri, create=True)
    _, state = load_state(store, name)  # an altered log refuses registrations before any upload
    file_records = {rel: {"sha256": cached_sha256(path), "size": path.stat().st_size} for rel, path in files}
    wanted = _registration_record(file_records, metrics_d, params_d, lineage_d, extra_d)
    if reuse and (twin := _matching_version(store, name, state, wanted, _reuse_candidates(state))) is not None:
        return {**twin, "reused": True}  # nothing uploaded, nothing written
    recorded = _blobs_of_latest_version(store, name, state)

    storage: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=scratch_dir("register-"), prefix="register-") as tmp:
        for index, (rel, path) in enumerate(files):
            digest, size = file_records[rel]["sha256"], file_records[rel]["size"]
            if compact and rel.endswith(".safetensors") and size > 0:
                packed = Path(tmp) / f"{index}.perp-sparse.safetensors"
                info = pack_file(path, packed, fsync=False)  # a temporary file: uploaded, then removed
                if info["sha256"] != digest:
                    raise RegistryError(f"'{path}' changed while it was being registered")
                if info["packed_size"] < size:
                    packed_digest = info["packed_sha256"]  # computed while writing it: no second read
                    ref = store.put_blob(packed, packed_digest, refresh=packed_digest not in recorded)
                    storage[rel] = {"encoding": ENCODING_SPARSE, "blob": ref.sha256, "size": ref.size}
                    packed.unlink()
                    continue
                packed.unlink()
            ref = store.put_blob(path, digest, refresh=digest not in recorded)
            storage[rel] = {"encoding": ENCODING_RAW, "blob": ref.sha256, "size": ref.size}

    manifest = jsonable({
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "files": file_records,
        "storage": storage,
        "bytes": sum(r["size"] for r in file_records.values()),
        "stored_bytes": sum(r["size"] for r in storage.values()),
        "metrics": metrics_d,
        "params": params_d,
        "lineage": lineage_d,
        "extra": extra_d,
        "code": code_version(),
        "dvc_outs": dvc_outs(),
        "prefect_flow_run_id": prefect_flow_run_id(flow_run_id),
        "who": who(store.principal()),
        "when": utc_now(),
    })
    manifest_ref = store.put_blob_bytes(canonical(manifest))
    # A concurrent `gc` may have collected a re-used blob between its upload check and now: look again just
    # before the version becomes visible, so a version never names a missing blob.
    missing = [entry["blob"] for entry in storage.values() if store.head(blob_key(entry["blob"])) is None]
    if missing or store.head(blob_key(manifest_ref.sha256)) is None:
        raise RegistryError(f"{len(missing) or 1} blob(s) of '{name}' vanished while registering (a concurrent "
                            "`perp registry gc`?); nothing was registered; register again")

    seen_head = state.head_seq

    def build(current: ModelState) -> dict[str, Any]:
        if reuse:
            raced = [v for v in _reuse_candidates(current) if current.versions[v].seq > seen_head]
            if (twin := _matching_version(store, name, current, wanted, raced)) is not None:
                raise _AlreadyRegistered(twin)
        return {"type": "register", "version": current.next_version, "manifest_sha256": manifest_ref.sha256,
                "files": len(file_records), "bytes": manifest["bytes"], "stored_bytes": manifest["stored_bytes"]}

    try:
        event, _ = append_event(store, name, build)
    except _AlreadyRegistered as raced:
        return {**raced.manifest, "reused": True}
    result = {**manifest, "version": event["version"], "manifest_sha256": manifest_ref.sha256,
              "event": _event_summary(event)}
    return {**result, "reused": False} if reuse else result


class _AlreadyRegistered(Exception):
    """Raised from an append's build: a concurrent writer registered the same thing first."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        super().__init__(f"version {manifest.get('version')} records the same registration")
        self.manifest = manifest


def _registration_record(files: dict[str, dict[str, Any]], metrics: Optional[dict], params: Optional[dict],
                         lineage: Optional[dict], extra: Optional[dict]) -> dict[str, Any]:
    """What makes two registrations the same, in the form a stored manifest holds it."""
    return json.loads(canonical(jsonable({"files": files, "metrics": metrics, "params": params, "lineage": lineage,
                                          "extra": extra})))


def _matching_version(store: Store, name: str, state: ModelState, wanted: dict[str, Any],
                      candidates: list[int]) -> Optional[dict[str, Any]]:
    """The first of `candidates` whose manifest records `wanted`, as its manifest + version; else None."""
    for version in candidates:
        try:
            manifest = _load_manifest(store, name, state, version)
        except (RegistryError, StoreError):
            continue  # an unreadable version is never reused: `verify` reports it
        if {key: manifest.get(key) for key in wanted} == wanted:
            record = state.versions[version]
            return {**manifest, "version": version, "manifest_sha256": record.manifest_sha256,
                    "stages": state.stages_of(version), "registered_event": record.seq}
    return None


def find_version(store_uri: StoreLike, name: str, model_dir: Path, metrics: Optional[dict] = None,
                 params: Optional[dict] = None, lineage: Optional[dict] = None,
                 extra: Optional[dict] = None) -> Optional[dict[str, Any]]:
    """The active version of `name` that already records exactly this registration, else None.

    Candidates are the recent active versions and those a stage holds (`_reuse_candidates`); one matches when its manifest
    lists the same files (path, sha256, size) and the same metrics, params, lineage and extra as
    `register_version` would record for these arguments (`metrics` as given, no metrics.json default). Nothing
    is written; an absent store or model is None. Returns the version's manifest + version, like `show`.
    """
    from perp.io.hashing import cached_sha256

    name = validate_name(name)
    store = store_uri if isinstance(store_uri, Store) else open_store(store_uri)
    if not store.exists():
        return None
    _, state = load_state(store, name)
    candidates = _reuse_candidates(state)
    if not candidates:
        return None
    model_dir = Path(model_dir)
    files = {rel: {"sha256": cached_sha256(path), "size": path.stat().st_size} for rel, path in _model_files(model_dir)}
    wanted = _registration_record(files, _dict_or_none(metrics, "metrics"), _dict_or_none(params, "params"),
                                  _dict_or_none(lineage, "lineage"), _dict_or_none(extra, "extra"))
    return _matching_version(store, name, state, wanted, candidates)


#: How many of the newest active versions a re-registration compares against (besides those stages hold).
REUSE_LOOKBACK = 100


def _reuse_candidates(state: ModelState) -> list[int]:
    """Active versions a re-run may return, newest first: the `REUSE_LOOKBACK` newest and every one a stage
    holds (a registry with a long history compares against its recent past, not all of it)."""
    active = {v for v, record in state.versions.items() if not record.deregistered}
    held = {state.current(stage) for stage in state.stacks} - {None}
    recent = set(sorted(active, reverse=True)[:REUSE_LOOKBACK])
    return sorted((recent | held) & active, reverse=True)


def _blobs_of_latest_version(store: Store, name: str, state: ModelState) -> set[str]:
    """The blobs the model's newest recorded version names (empty when there is none or it cannot be read).

    A blob a recorded version names is never collected by gc, so re-using it needs no refresh: re-registering
    unchanged weights (a nightly run) costs no server-side copy. Any other re-used blob is refreshed.
    """
    if not state.versions:
        return set()
    try:
        storage = _load_manifest(store, name, state, max(state.versions)).get("storage")
        return {entry["blob"] for entry in storage.values() if isinstance(entry.get("blob"), str)}
    except (RegistryError, StoreError, ValueError, AttributeError, TypeError):
        return set()


# --------------------------------------------------------------------------------------------- stage moves


def promote(store_uri: StoreLike, name: str, version: Union[int, str], to_stage: str, reason: Optional[str] = "",
            force: bool = False, gates: Optional[Mapping[str, Any]] = None,
            stages: Optional[list[str]] = None) -> dict[str, Any]:
    """Put `version` in `to_stage` if it passes the stage's gates (or `force` with a reason, recorded).

    The promotion policy (the stage ladder and each stage's gates) is the one the version was registered under,
    as its manifest's params record it. `stages`/`gates` that differ from it are an override: refused unless
    forced with a reason, and recorded as forced with the policy used. A version registered without params has
    no recorded policy; the given (or default) one applies, and the event says so.
    """
    name, version = validate_name(name), validate_version(version)
    validate_stage(to_stage)
    if stages is not None:
        validate_stages(list(stages))
    reason = _reason(reason, "--force needs a reason (--reason TEXT): a forced promotion is recorded with it"
                     if force else None)
    store = _store(store_uri)
    manifests: dict[int, dict[str, Any]] = {}

    def build(state: ModelState) -> dict[str, Any]:
        _require_model(state, store, name)
        record = state.require_version(version)
        if record.deregistered:
            raise RegistryError(f"version {version} of '{name}' is deregistered and cannot be promoted")
        previous = state.current(to_stage)
        if previous == version:
            raise RegistryError(f"version {version} of '{name}' is already in '{to_stage}'")
        if version not in manifests:
            manifests[version] = _load_manifest(store, name, state, version)
        policy = _promotion_policy(manifests[version], stages, gates)
        if policy["override"] and not force:
            raise RegistryError(
                f"promotion of '{name}' v{version} to '{to_stage}' refused: {policy['override']}. Nothing was "
                "recorded; promote with the policy it was registered under (its params.yaml), or override with "
                "--force --reason TEXT (recorded as a forced promotion)")
        used_stages, used_gates = _stage_config(policy["stages"], policy["gates"])
        validate_stage(to_stage, used_stages)
        evaluation = evaluate_gates(to_stage, used_stages, used_gates.get(to_stage),
                                    manifests[version].get("metrics"), record.stages_ever)
        if not evaluation["passed"] and not force:
            raise GateRefused(f"promotion of '{name}' v{version} to '{to_stage}' refused: "
                              f"{describe_failures(evaluation)}. Nothing was recorded; override with --force "
                              "--reason TEXT (recorded as a forced promotion)", evaluation)
        forced = bool(force and (evaluation["failed"] or policy["override"]))
        return {"type": "promote", "version": version, "stage": to_stage, "previous_version": previous,
                "reason": reason, "forced": forced, "force_requested": bool(force),
                "gates": evaluation, "failed_gates": evaluation["failed"], "policy": policy}

    event, _ = append_event(store, name, build)
    return {"name": name, "version": version, "stage": to_stage, "previous_version": event["previous_version"],
            "forced": event["forced"], "failed_gates": event["failed_gates"], "reason": reason,
            "gates": event["gates"], "event": _event_summary(event)}


def _policy_dump(stages: list[str], gates: Mapping[str, GatesConfig]) -> dict[str, Any]:
    return {"stages": list(stages),
            "gates": {stage: config.model_dump(mode="json") for stage, config in sorted(gates.items())}}


def _promotion_policy(manifest: dict[str, Any], stages: Optional[list[str]],
                      gates: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The policy a promotion uses and where it comes from; `override` says how it departs from the recorded one.

    What the caller leaves out (None) is the recorded policy's; without a recorded policy, the library defaults.
    """
    register = ((manifest.get("params") or {}).get("register") or {}) if isinstance(manifest.get("params"), dict) \
        else {}
    if not isinstance(register, dict) or ("stages" not in register and "gates" not in register):
        return {"source": "caller", **_policy_dump(*_stage_config(stages, gates)), "override": None}
    try:
        recorded = _policy_dump(*_stage_config(register.get("stages"), register.get("gates")))
    except RegistryError:
        return {"source": "caller", **_policy_dump(*_stage_config(stages, gates)),
                "override": "the policy recorded at registration is invalid"}
    used = _policy_dump(*_stage_config(stages if stages is not None else recorded["stages"],
                                       gates if gates is not None else recorded["gates"]))
    if recorded == used:
        return {"source": "registration", **recorded, "override": None}
    changes = [f"stages {recorded['stages']} → {used['stages']}"] if recorded["stages"] != used["stages"] else []
    for stage in sorted(set(recorded["gates"]) | set(used["gates"])):
        before, after = recorded["gates"].get(stage), used["gates"].get(stage)
        if before != after:
            changes.append(f"gates.{stage} {_gates_text(before)} → {_gates_text(after)}")
        if len(changes) >= 4:
            break
    return {"source": "caller", **used, "registered": recorded,
            "override": "its policy differs from the one it was registered under (" + "; ".join(changes) + ")"}


def _gates_text(gates: Optional[dict[str, Any]]) -> str:
    if gates is None:
        return "none"
    return "{" + ", ".join(f"{key}: {value}" for key, value in sorted(gates.items())) + "}"


def rollback(store_uri: StoreLike, name: str, stage: str = "prod", reason: Optional[str] = None,
             stages: Optional[list[str]] = None) -> dict[str, Any]:
    """Put the stage back on the version it held before its current one (a stack: repeated rollbacks go
    further back). Rolling back the first version a stage ever held leaves the stage empty (`pull NAME@STAGE`
    then refuses), which is how a bad first prod version is withdrawn. Needs a reason."""
    name = validate_name(name)
    stage_list, _ = _stage_config(stages, {})
    validate_stage(stage, stage_list)
    reason = _reason(reason, "rollback needs a reason (--reason TEXT)")
    store = _store(store_uri)

    def build(state: ModelState) -> dict[str, Any]:
        _require_model(state, store, name)
        stack = state.stacks.get(stage) or []
        if not stack:
            raise RegistryError(f"'{stage}' of '{name}' holds no version: nothing to roll back")
        return {"type": "rollback", "stage": stage, "version": stack[-2] if len(stack) > 1 else None,
                "previous_version": stack[-1], "reason": reason}

    event, _ = append_event(store, name, build)
    return {"name": name, "stage": stage, "version": event["version"], "previous_version": event["previous_version"],
            "reason": reason, "event": _event_summary(event)}


def deregister(store_uri: StoreLike, name: str, version: Union[int, str],
               reason: Optional[str] = None) -> dict[str, Any]:
    """Withdraw a version: it can no longer be promoted or pulled; its record and blobs stay for the audit."""
    name, version = validate_name(name), validate_version(version)
    reason = _reason(reason, "deregister needs a reason (--reason TEXT)")
    store = _store(store_uri)

    def build(state: ModelState) -> dict[str, Any]:
        _require_model(state, store, name)
        record = state.require_version(version)
        if record.deregistered:
            raise RegistryError(f"version {version} of '{name}' is already deregistered")
        held = state.stages_of(version)
        if held:
            raise RegistryError(f"version {version} of '{name}' is in {', '.join(held)}: promote or roll back "
                                "another version there first")
        return {"type": "deregister", "version": version, "reason": reason}

    event, _ = append_event(store, name, build)
    return {"name": name, "version": version, "reason": reason, "event": _event_summary(event)}


# --------------------------------------------------------------------------------------------- reading


def _model_names(store: Store) -> list[str]:
    return [n for n in store.list_children(models_prefix()) if _is_name(n)]


def _is_name(value: str) -> bool:
    try:
        validate_name(value)
        return True
    except RegistryError:
        return False


def _truncation(name: str, key: str, pointer_seq: int, head: int) -> str:
    return (f"stage pointer {key} records event {pointer_seq} of '{name}' but its log ends at event {head}: events "
            "were deleted, and what the log says now (an older stage, a withdrawn version) cannot be trusted")


def _require_untruncated(store: Store, name: str, state: ModelState, stage: str) -> None:
    """Refuse to serve a stage from a log that lost its newest events (the stage's pointer is ahead of it):
    it would hand out the version a deleted rollback had withdrawn."""
    pointer, _ = read_pointer(store, name, stage)
    seq = pointer.get("seq") if isinstance(pointer, dict) else None
    if isinstance(seq, int) and _log_lost(store, name, state.head_seq, seq):
        raise RegistryIntegrityError(_truncation(name, pointer_key(name, stage), seq, state.head_seq))


def _log_lost(store: Store, name: str, head: int, pointer_seq: int) -> bool:
    """Whether a pointer recording event `pointer_seq` shows events deleted from a log read up to `head`. The
    pointer is read after the log, so a write landing in between puts it legitimately ahead: that event exists."""
    return pointer_seq > head and store.head(event_key(name, pointer_seq)) is None


def _resolve(state: ModelState, name: str, selector: Union[int, str]) -> int:
    if selector == LATEST:
        active = [v for v, r in state.versions.items() if not r.deregistered]
        if not active:
            raise RegistryError(f"model '{name}' has no active version")
        return max(active)
    if isinstance(selector, int):
        record = state.require_version(selector)
        if record.deregistered:
            raise RegistryError(f"version {selector} of '{name}' is deregistered")
        return selector
    current = state.current(selector)
    if current is None:
        in_use = sorted(stage for stage, stack in state.stacks.items() if stack)
        emptied = " (its last version was rolled back)" if selector in state.stacks else ""
        raise RegistryError(f"'{name}' has no version in stage '{selector}'{emptied}"
                            + (f" (stages in use: {', '.join(in_use)})" if in_use else ""))
    return current


def list_models(store_uri: StoreLike) -> list[dict[str, Any]]:
    """Every model in the store: active versions, latest, what each stage holds."""
    store = _store(store_uri)
    models = []
    for name in _model_names(store):
        try:
            events, state = load_state(store, name)
        except RegistryIntegrityError as error:
            models.append({"name": name, "integrity_error": str(error)})
            continue
        if not events:
            continue
        active = sorted(v for v, r in state.versions.items() if not r.deregistered)
        models.append({"name": name, "versions": len(active), "latest": active[-1] if active else None,
                       "stages": {s: state.current(s) for s in sorted(state.stacks) if state.current(s)},
                       "events": state.head_seq, "updated": events[-1]["when"]})
    return models


def show(store_uri: StoreLike, name: str, version: Union[int, str, None] = None) -> dict[str, Any]:
    """A model's versions and stages; with `version` (a number, a stage or 'latest'), that version's manifest."""
    name = validate_name(name)
    store = _store(store_uri)
    events, state = load_state(store, name)
    _require_model(state, store, name)
    if version is None:
        versions = []
        for number, record in sorted(state.versions.items()):
            versions.append({"version": number, "when": record.when, "who": record.who,
                             "stages": state.stages_of(number), "deregistered": record.deregistered})
        return {"name": name, "stages": {s: state.current(s) for s in sorted(state.stacks) if state.current(s)},
                "versions": versions, "events": state.head_seq, "head_hash": state.head_hash}
    selector = validate_version(version) if isinstance(version, int) else parse_ref(f"{name}@{version}")[1]
    if isinstance(selector, int):
        number = state.require_version(selector).version  # deregistered versions can still be inspected
    else:
        if selector != LATEST:
            _require_untruncated(store, name, state, selector)
        number = _resolve(state, name, selector)
    manifest = _load_manifest(store, name, state, number)
    record = state.versions[number]
    return {**manifest, "version": number, "manifest_sha256": record.manifest_sha256,
            "stages": state.stages_of(number), "stages_ever": sorted(record.stages_ever),
            "deregistered": record.deregistered, "registered_event": record.seq}


def history(store_uri: StoreLike, name: str, stage: Optional[str] = None,
            version: Union[int, str, None] = None) -> list[dict[str, Any]]:
    """The model's events, oldest first, optionally only those for one stage or one version."""
    name = validate_name(name)
    if stage is not None:
        validate_stage(stage)
    number = validate_version(version) if version is not None else None
    store = _store(store_uri)
    events, state = load_state(store, name)
    _require_model(state, store, name)
    return [e for e in events if (stage is None or e.get("stage") == stage)
            and (number is None or e.get("version") == number or e.get("previous_version") == number)]


# --------------------------------------------------------------------------------------------- pull


def pull(store_uri: StoreLike, ref: str, out_dir: Union[str, Path]) -> dict[str, Any]:
    """Download `NAME@STAGE`, `NAME@VERSION` or `NAME@latest` into `out_dir` as a plain Hugging Face checkpoint.

    Every blob is verified on download, every packed file is rebuilt and checked against the manifest's sha256,
    and `out_dir` appears only once everything matched. `out_dir` must be absent, empty, or a previous perp output.
    """
    from perp.io.atomic import atomic_directory, is_complete
    from perp.store.sparse_format import unpack_file

    name, selector = parse_ref(ref)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_complete(out_dir))):
        raise RegistryError(f"'{out_dir}' exists and is not empty; choose another --out (perp replaces only its own "
                            "complete outputs)")
    store = _store(store_uri)
    events, state = load_state(store, name)
    _require_model(state, store, name)
    if isinstance(selector, str) and selector != LATEST:
        _require_untruncated(store, name, state, selector)
    version = _resolve(state, name, selector)
    manifest = _load_manifest(store, name, state, version)
    files, storage = manifest.get("files"), manifest.get("storage")
    if not isinstance(files, dict) or not isinstance(storage, dict):
        raise RegistryIntegrityError(f"manifest of '{name}' v{version} is malformed")
    with atomic_directory(out_dir, kind="pull") as staging:
        scratch = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f".{out_dir.name}.pull-"))
        try:
            for rel in sorted(files):
                target = staging / _safe_relpath(rel)
                entry = storage.get(rel)
                if not isinstance(entry, dict) or not isinstance(files[rel], dict):
                    raise RegistryIntegrityError(f"manifest of '{name}' v{version}: '{rel}' has no storage record")
                try:
                    if entry["encoding"] == ENCODING_RAW:
                        if entry["blob"] != files[rel]["sha256"]:
                            raise RegistryIntegrityError(f"manifest of '{name}' v{version}: '{rel}' is inconsistent")
                        store.get_blob(entry["blob"], target)
                    elif entry["encoding"] == ENCODING_SPARSE:
                        packed = store.get_blob(entry["blob"], scratch / "packed.safetensors")
                        unpack_file(packed, target, expected_sha256=files[rel]["sha256"])
                        packed.unlink()
                    else:
                        raise RegistryError(f"'{rel}' of '{name}' v{version} uses encoding '{entry['encoding']}', "
                                            "which this perp cannot read; upgrade perp")
                except StoreNotFound:
                    raise RegistryIntegrityError(f"file '{rel}' of '{name}' v{version} "
                                                 f"({blob_key(entry['blob'])}) is missing from the store") from None
                except StoreIntegrityError as error:
                    raise RegistryIntegrityError(f"file '{rel}' of '{name}' v{version}: {error}") from None
                if target.stat().st_size != files[rel]["size"]:
                    raise RegistryIntegrityError(f"file '{rel}' of '{name}' v{version} has the wrong size")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record = {"name": name, "version": version, "ref": ref, "store": scrub_secrets(store.describe()),
                  "manifest_sha256": state.versions[version].manifest_sha256,
                  "stages": state.stages_of(version), "head": {"seq": state.head_seq, "hash": state.head_hash},
                  "pulled": utc_now()}
        (staging / PULL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {"name": name, "version": version, "ref": ref, "out": str(out_dir), "files": len(files),
            "bytes": manifest["bytes"], "stages": state.stages_of(version),
            "manifest_sha256": state.versions[version].manifest_sha256}


# --------------------------------------------------------------------------------------------- verify


def verify(store_uri: StoreLike, name: Optional[str] = None, deep: bool = True,
           anchors: Optional[list[str]] = None) -> dict[str, Any]:
    """Recompute every event chain, every manifest hash and (with `deep`) every stored file's sha256.

    The chain makes any change to a recorded event evident, but someone able to rewrite the whole store could
    rebuild a consistent history, or drop the newest events. `anchors` closes that gap: event hashes recorded
    elsewhere (a head hash printed by an earlier verify, kept in git or CI); each must still be in the log.

    Returns ``{"ok", "store", "deep", "models": {name: {events, head_hash, versions, stages}}, "checked": {...},
    "problems": [{"kind", "name", "key", "seq", "version", "file", "message"}]}`` (seq, version and file are None
    where they do not apply). Nothing is modified.
    """
    store = _store(store_uri)
    if name is not None:
        validate_name(name)
    names = [name] if name is not None else _model_names(store)
    problems: list[dict[str, Any]] = []
    checked = {"events": 0, "manifests": 0, "blobs": 0, "bytes": 0}
    models: dict[str, Any] = {}
    blob_cache: dict[str, Optional[str]] = {}  # sha -> problem message or None

    if name is None:
        for stray in store.list_children(models_prefix()):
            if not _is_name(stray):
                problems.append({"kind": "stray_key", "name": stray, "key": f"models/{stray}",
                                 "message": f"models/{stray} is not a valid model name"})

    for model in names:
        events, log_problems = scan_log(store, model)
        if not events and not log_problems and name is not None:
            raise RegistryError(f"model '{model}' not found in {store.describe()}")
        for p in log_problems:
            problems.append({"kind": p.kind, "name": model, "key": p.key, "seq": p.seq, "message": p.message})
        checked["events"] += len(events)
        state = ModelState(model)
        for event in events:
            try:
                state.apply(event)
            except (RegistryIntegrityError, KeyError, TypeError) as error:
                seq = event.get("seq")
                message = str(error) if isinstance(error, RegistryIntegrityError) else \
                    f"event {seq} of '{model}' is malformed ({type(error).__name__}: {error})"
                problems.append({"kind": "event_invalid", "name": model, "key": event_key(model, seq)
                                 if isinstance(seq, int) else "", "seq": seq, "message": message})

        for number, record in sorted(state.versions.items()):
            where = f"'{model}' v{number}"
            key = blob_key(record.manifest_sha256)
            try:
                manifest = json.loads(store.get_blob_bytes(record.manifest_sha256))
                checked["manifests"] += 1
            except StoreNotFound:
                problems.append({"kind": "manifest_missing", "name": model, "version": number, "key": key,
                                 "message": f"manifest of {where} ({key}) is missing"})
                continue
            except (StoreIntegrityError, ValueError):
                problems.append({"kind": "manifest_altered", "name": model, "version": number, "key": key,
                                 "message": f"manifest of {where} ({key}) was altered: its content no longer "
                                            f"matches the sha256 recorded by event {record.seq}"})
                continue
            storage = manifest.get("storage") if isinstance(manifest, dict) else None
            if not isinstance(storage, dict) or not all(isinstance(e, dict) for e in storage.values()):
                problems.append({"kind": "manifest_invalid", "name": model, "version": number, "key": key,
                                 "message": f"manifest of {where} ({key}) is malformed"})
                continue
            for rel, entry in sorted(storage.items()):
                digest = entry.get("blob", "")
                try:
                    bkey = blob_key(digest)
                except StoreError:
                    problems.append({"kind": "manifest_invalid", "name": model, "version": number, "file": rel,
                                     "key": key, "message": f"manifest of {where} names an invalid blob for '{rel}'"})
                    continue
                if digest not in blob_cache:
                    blob_cache[digest] = _check_blob(store, digest, entry.get("size"), deep, checked)
                if blob_cache[digest]:
                    kind = "blob_missing" if "missing" in blob_cache[digest] else "blob_altered"
                    problems.append({"kind": kind, "name": model, "version": number, "file": rel, "key": bkey,
                                     "message": f"file '{rel}' of {where} ({bkey}) {blob_cache[digest]}"})

        for stage in sorted(state.stacks):
            key = pointer_key(model, stage)
            pointer, _ = read_pointer(store, model, stage)
            seq, digest = state.stage_events[stage]
            expected = state.current(stage)
            if pointer is None:
                problems.append({"kind": "pointer_missing", "name": model, "key": key, "message":
                                 f"stage pointer {key} is missing; the log puts version {expected} there "
                                 f"(event {seq}); the next registry write restores it"})
            elif isinstance(pointer.get("seq"), int) and _log_lost(store, model, state.head_seq, pointer["seq"]):
                problems.append({"kind": "log_truncated", "name": model, "key": key,
                                 "message": _truncation(model, key, pointer["seq"], state.head_seq)})
            elif isinstance(pointer.get("seq"), int) and pointer["seq"] > state.head_seq:
                pass  # a write landed after the log was read: the pointer is ahead of this read, not wrong
            elif ((pointer.get("version"), pointer.get("seq")) == (expected, seq)
                  and pointer.get("event_hash") != digest):
                problems.append({"kind": "pointer_altered", "name": model, "key": key,
                                 "message": f"stage pointer {key} records another hash for event {seq} than the log "
                                            f"holds: event {seq} ({event_key(model, seq)}) or the pointer was altered"})
            elif (pointer.get("version"), pointer.get("seq"), pointer.get("event_hash")) != (expected, seq, digest):
                stale = isinstance(pointer.get("seq"), int) and pointer["seq"] < seq
                problems.append({"kind": "pointer_stale" if stale else "pointer_altered", "name": model, "key": key,
                                 "message": f"stage pointer {key} says version {pointer.get('version')} "
                                            f"(event {pointer.get('seq')}), the log says version {expected} "
                                            f"(event {seq})" + ("; a writer stopped before moving it, the next "
                                                                "registry write repairs it" if stale else
                                                                ": the pointer was altered")})
        for child in store.list_children(stages_prefix(model)):
            stage = child[:-len(".json")] if child.endswith(".json") else child
            if stage not in state.stacks:
                key = f"{stages_prefix(model)}/{child}"
                problems.append({"kind": "pointer_altered", "name": model, "key": key,
                                 "message": f"stage pointer {key} has no event behind it: it was planted"})
        if events:
            models[model] = {"events": len(events), "head_hash": state.head_hash, "versions": len(state.versions),
                             "stages": {s: state.current(s) for s in sorted(state.stacks) if state.current(s)},
                             "_hashes": [e.get("hash") for e in events]}
    seen_hashes = {h for info in models.values() for h in info.pop("_hashes")}
    for anchor in anchors or []:
        if anchor not in seen_hashes:
            problems.append({"kind": "anchor_missing", "name": name, "key": "", "message":
                             f"anchored event {anchor} is not in the log: the history was rewritten or truncated"})
    problems = [{"seq": None, "version": None, "file": None, **problem} for problem in problems]
    return {"ok": not problems, "store": store.describe(), "deep": deep, "models": models, "checked": checked,
            "problems": problems}


def _check_blob(store: Store, digest: str, size: Any, deep: bool, checked: dict[str, int]) -> Optional[str]:
    key = blob_key(digest)
    info = store.head(key)
    if info is None:
        return "is missing from the store"
    checked["blobs"] += 1
    if isinstance(size, int) and info.size != size:
        return f"was altered: {info.size} bytes stored, {size} recorded"
    if deep:
        try:
            actual, length = store.hash_object(key)
        except StoreNotFound:
            return "is missing from the store"
        checked["bytes"] += length
        if actual != digest:
            return f"was altered: its content has sha256 {actual}"
    return None


# --------------------------------------------------------------------------------------------- gc


def _gc_refusal(message: str) -> RegistryError:
    return RegistryError(f"gc refused, nothing deleted: {message} (run `perp registry verify`; gc never deletes "
                         "on a partial view of the store)")


def _referenced(store: Store) -> tuple[set[str], dict[str, int]]:
    """Every manifest an event of any model names (deregistered versions included) and every blob those
    manifests name. Anything unread or not understood is a RegistryError: the view would be partial."""
    for child in store.list_children(models_prefix()):
        if not _is_name(child):
            raise _gc_refusal(f"models/{child} is not a valid model name, so its events cannot be read")
    manifests: dict[str, str] = {}  # sha256 -> where, for messages
    names = _model_names(store)
    for model in names:
        try:
            events, _ = load_state(store, model)  # chain, hashes and replay: any problem refuses
        except RegistryError as error:
            raise _gc_refusal(str(error).split(" (run `perp registry verify`")[0]) from None
        except (KeyError, TypeError, AttributeError) as error:
            raise _gc_refusal(f"an event of '{model}' is malformed ({type(error).__name__}: {error})") from None
        head = events[-1]["seq"] if events else 0
        for child in store.list_children(stages_prefix(model)):
            pointer, _ = read_pointer(store, model, child[:-len(".json")] if child.endswith(".json") else child)
            seq = pointer.get("seq") if isinstance(pointer, dict) else None
            if isinstance(seq, int) and _log_lost(store, model, head, seq):
                raise _gc_refusal(f"stage pointer {stages_prefix(model)}/{child} records event {seq} of '{model}' "
                                  f"but its log ends at event {head}: events were deleted")
        for event in events:
            digest = event.get("manifest_sha256")
            if digest is None and event.get("type") != "register":
                continue
            where = f"'{model}' v{event.get('version')} (event {event.get('seq')})"
            try:
                manifests[validate_sha256(digest)] = where
            except StoreError:
                raise _gc_refusal(f"{where} names no valid manifest sha256") from None

    def fetch(digest: str) -> Any:
        try:
            return store.get_blob_bytes(digest)
        except (StoreNotFound, StoreIntegrityError) as error:
            return error

    getattr(store, "client", None)  # create a shared S3 client before the threads do
    with ThreadPoolExecutor(max_workers=8) as pool:
        contents = dict(zip(manifests, pool.map(fetch, list(manifests))))
    referenced = set(manifests)
    for digest, data in contents.items():
        where = f"the manifest of {manifests[digest]} ({blob_key(digest)})"
        if isinstance(data, StoreNotFound):
            raise _gc_refusal(f"{where} is missing")
        if isinstance(data, StoreIntegrityError):
            raise _gc_refusal(f"{where} was altered: its content no longer matches its sha256")
        try:
            manifest = json.loads(data)
        except ValueError:
            raise _gc_refusal(f"{where} is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
            schema = manifest.get("schema") if isinstance(manifest, dict) else None
            raise _gc_refusal(f"{where} has schema {schema!r}, not {MANIFEST_SCHEMA!r}: written by another perp "
                              "version, which may name blobs this one does not know of; upgrade perp")
        storage = manifest.get("storage")
        if not isinstance(storage, dict):
            raise _gc_refusal(f"{where} is malformed (no storage record)")
        for rel, entry in storage.items():
            if not isinstance(entry, dict) or entry.get("encoding") not in ENCODINGS:
                encoding = entry.get("encoding") if isinstance(entry, dict) else None
                raise _gc_refusal(f"{where} stores '{rel}' with encoding {encoding!r}, which this perp does not "
                                  "know; upgrade perp")
            try:
                referenced.add(validate_sha256(entry.get("blob")))
            except StoreError:
                raise _gc_refusal(f"{where} names an invalid blob for '{rel}'") from None
    return referenced, {"models": len(names), "manifests": len(manifests)}


def _grace_seconds(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RegistryError(f"older_than_seconds must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _stale_uploads(store: Store, now: float, grace: float, dry_run: bool) -> dict[str, Any]:
    """Uploads killed before they completed (a hidden temporary file, an unfinished S3 multipart upload): older
    than the grace period, they are removed unless `dry_run`; younger ones may still be running."""
    found = list(store.stale_uploads())
    old = [upload for upload in found if now - upload.last_modified >= grace]
    if not dry_run:
        for upload in old:
            store.remove_stale_upload(upload)
    return {"stale_uploads": len(found), "stale_upload_bytes": sum(u.size or 0 for u in found),
            "stale_uploads_removed": len(old), "stale_upload_names": [u.name for u in old]}


def gc(store_uri: StoreLike, *, older_than_seconds: float = GC_GRACE_SECONDS, dry_run: bool = True) -> dict[str, Any]:
    """Delete the blobs no recorded version names (left by registrations that failed or were killed before their
    event) once they are older than `older_than_seconds`. With `dry_run` (the default) nothing is deleted: the
    report says what would be.

    Referenced: every manifest any event of any model names, deregistered versions included (their blobs stay
    for the audit), and every blob those manifests name. Any event or manifest that cannot be read, does not
    match its hash or is not understood is a `RegistryError` before anything is deleted, and so is a stage
    pointer recording an event the log no longer has (newest events deleted; a truncated log with no such
    pointer is invisible here, as it is to `verify` without anchors).

    Safety alongside writers: blobs are listed before the log is read, so a version recorded meanwhile is seen.
    A registration in progress has blobs no event names yet; they are young (just uploaded, or refreshed by
    `Store.put_blob` when re-used), so the grace period keeps them as long as a registration takes less than it.
    Each blob is checked again just before it is deleted and kept if it was refreshed since the listing; what
    remains is a re-use landing between that check and the delete. Ages are measured on this machine's clock
    against the store's timestamps (S3: the server's), so keep the grace period well above any clock skew, and
    use 0 only when nothing is registering. What killed uploads left (the hidden temporary file of a local
    upload, the parts of an unfinished S3 multipart upload) is listed too and, past the grace period, removed.

    Returns ``{"store", "dry_run", "older_than_seconds", "models", "manifests", "scanned", "scanned_bytes",
    "referenced", "orphaned", "orphaned_bytes", "kept_young", "deleted", "bytes_reclaimed", "deleted_keys",
    "stale_uploads", "stale_upload_bytes", "stale_uploads_removed", "stale_upload_names"}``
    (`scanned` = `referenced` + `orphaned`; `orphaned` = `kept_young` + `deleted`, less any gone meanwhile); with
    `dry_run`, `deleted`, `bytes_reclaimed` and `deleted_keys` are what ``dry_run=False`` would delete now.
    """
    grace = _grace_seconds(older_than_seconds)
    store = _store(store_uri)
    started = time.time()
    blobs = {blob.sha256: blob for blob in store.list_blobs()}  # listed first: see the note above
    referenced, counts = _referenced(store)
    orphans = sorted((blob for digest, blob in blobs.items() if digest not in referenced), key=lambda b: b.sha256)
    kept_young = 0
    deleted: list[str] = []
    reclaimed = 0
    for blob in orphans:
        if started - blob.last_modified < grace:
            kept_young += 1
            continue
        key = blob_key(blob.sha256)
        size = blob.size
        if not dry_run:
            current = store.head(key)
            if current is None:
                continue  # already gone (another gc)
            if current.last_modified is None or time.time() - current.last_modified < grace:
                kept_young += 1  # re-used by a registration since the listing
                continue
            store.delete_blob(blob.sha256)
            size = current.size
        deleted.append(key)
        reclaimed += size
    stale = _stale_uploads(store, started, grace, dry_run)
    return {"store": store.describe(), "dry_run": dry_run, "older_than_seconds": grace, **counts, **stale,
            "scanned": len(blobs), "scanned_bytes": sum(b.size for b in blobs.values()),
            "referenced": len(blobs) - len(orphans),
            "orphaned": len(orphans), "orphaned_bytes": sum(b.size for b in orphans), "kept_young": kept_young,
            "deleted": len(deleted), "bytes_reclaimed": reclaimed, "deleted_keys": deleted}
