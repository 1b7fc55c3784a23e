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

import contextlib
import json
import math
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from perp.config import GatesConfig, RegisterConfig
from perp.layout import METRICS_FILE
from perp.registry.events import (
    ModelState,
    RegistryIntegrityError,
    VersionState,
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


def _held_stages(state: ModelState) -> dict[str, int]:
    """Each stage that holds a version, and the version it holds."""
    return {s: version for s in sorted(state.stacks) if (version := state.current(s))}


def _event_summary(event: dict[str, Any]) -> dict[str, Any]:
    return {"seq": event["seq"], "hash": event["hash"], "when": event["when"], "who": event["who"]}


# --------------------------------------------------------------------------------------------- register


def _check_metrics_measured_this_model(metrics: Optional[dict[str, Any]], model_dir: Path) -> None:
    """Gate evidence must belong to the files registered: metrics with gate figures name the checkpoint hash they
    were measured on (`perp evaluate` writes it), and it is these files'. Metrics without gate figures (notes, a
    dense baseline) need not."""
    from perp.models.loading import model_content_hash

    measured_model = (metrics or {}).get("model")
    measured = measured_model.get("sha256") if isinstance(measured_model, dict) else None
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
    name = validate_name(name)
    model_dir = Path(model_dir)
    _require_pack_workers()
    files = _checkpoint_files(model_dir)
    if compact and not reuse:
        _require_packing_space(files)  # before hashing: a refusal should not wait for every file to be read
    described = _described(_metrics_or_file(metrics, model_dir), params, lineage, extra, model_dir)
    store = _store(store_uri, create=True)
    _, state = load_state(store, name)  # an altered log refuses registrations before any upload
    file_records = _file_records(files)
    wanted = _registration_record(file_records, **described)
    if reuse and (twin := _matching_version(store, name, state, wanted, _reuse_candidates(state))) is not None:
        return {**twin, "reused": True}  # nothing uploaded, nothing written
    if compact and reuse:
        _require_packing_space(files)  # only once no version can be reused: a reused one packs nothing
    recorded = _blobs_of_latest_version(store, name, state)
    storage = _upload_files(store, files, file_records, recorded, compact)
    manifest = _manifest(store, name, file_records, storage, described, flow_run_id)
    manifest_ref = store.put_blob_bytes(canonical(manifest))
    _require_uploads_present(store, name, storage, manifest_ref.sha256)
    return _append_registration(store, name, manifest, manifest_ref.sha256, wanted if reuse else None,
                                seen_head=state.head_seq)


def _require_packing_space(files: list[tuple[str, Path]]) -> None:
    """Packing keeps at most two packed files (each smaller than its source) in the scratch directory."""
    from perp.io.atomic import require_free_space
    from perp.io.cache import scratch_dir

    sizes = sorted(path.stat().st_size for rel, path in files if rel.endswith(".safetensors"))
    if not sizes:
        return
    require_free_space(scratch_dir("register-"), sum(sizes[-2:]), "the scratch directory",
                       "packing the two largest files", hint="free some space or point PERP_CACHE at a bigger disk")


def _require_pack_workers() -> None:
    """A bad PERP_PACK_WORKERS fails before anything is hashed, uploaded or downloaded, not at the first packing."""
    from perp.store.sparse_format import SparseFormatError, default_workers

    try:
        default_workers()
    except SparseFormatError as error:
        raise RegistryError(str(error)) from None


def _checkpoint_files(model_dir: Path) -> list[tuple[str, Path]]:
    """The files of the checkpoint to register (see `_model_files`); refused when there are none."""
    if not model_dir.is_dir():
        raise RegistryError(f"model directory '{model_dir}' does not exist")
    files = _model_files(model_dir)
    if not files:
        raise RegistryError(f"model directory '{model_dir}' holds no files")
    return files


def _metrics_or_file(metrics: Optional[dict], model_dir: Path) -> Any:
    """`metrics` as given, else the contents of `model_dir/metrics.json` when present (else None)."""
    if metrics is None and (model_dir / METRICS_FILE).is_file():
        try:
            return json.loads((model_dir / METRICS_FILE).read_text())
        except ValueError:
            raise RegistryError(f"'{model_dir / 'metrics.json'}' is not valid JSON") from None
    return metrics


def _described(metrics: Any, params: Any, lineage: Any, extra: Any, model_dir: Path) -> dict[str, Optional[dict]]:
    """What the caller says about the checkpoint (metrics, params, lineage, extra), scrubbed, in manifest order;
    metrics with gate figures must have been measured on `model_dir`."""
    described = {"metrics": _dict_or_none(metrics, "metrics"), "params": _dict_or_none(params, "params")}
    _check_metrics_measured_this_model(described["metrics"], model_dir)
    return {**described, "lineage": _dict_or_none(lineage, "lineage"), "extra": _dict_or_none(extra, "extra")}


def _file_records(files: list[tuple[str, Path]]) -> dict[str, dict[str, Any]]:
    """Every file's sha256 and size, by relative path: the manifest's `files`."""
    from perp.io.hashing import cached_sha256

    return {rel: {"sha256": cached_sha256(path), "size": path.stat().st_size} for rel, path in files}


def _in_background(function: Any, *args: Any, name: str) -> Future:
    """Run `function(*args)` on a daemon thread; its result or error arrives through the returned Future.

    A daemon thread, not a pool's: on Ctrl-C the process exits without waiting for a multi-GB transfer to end
    (what an interrupted transfer leaves, a temporary file or an unfinished S3 multipart upload, `gc` removes).
    """
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args))
        except BaseException as error:  # delivered to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@contextlib.contextmanager
def _settled_on_error(transfers: list[Future]) -> Iterator[None]:
    """On an error, let the transfer in flight end before the files it reads or writes are cleaned up (not on
    Ctrl-C, see `_in_background`)."""
    try:
        yield
    except Exception:
        wait(transfers)
        raise


def _upload_files(store: Store, files: list[tuple[str, Path]], records: dict[str, dict[str, Any]],
                  recorded: set[str], compact: bool) -> dict[str, dict[str, Any]]:
    """Upload every file as a blob (packed when `compact` makes it smaller); returns how each is stored, in file
    order: the manifest's `storage`. `recorded`: the blobs that need no refresh (`_blobs_of_latest_version`).

    One upload runs in the background while the next file is packed, so packing (CPU) and uploading (network,
    disk) overlap; at most two packed files exist at a time in the scratch directory. Errors come in file order:
    a failed upload is reported before a later file's packing error.
    """
    from perp.io.cache import scratch_dir

    uploads: list[Future] = []
    with tempfile.TemporaryDirectory(dir=scratch_dir("register-"), prefix="register-") as tmp, \
            _settled_on_error(uploads):
        for index, (rel, path) in enumerate(files):
            digest, size = records[rel]["sha256"], records[rel]["size"]
            previous = uploads[-1] if uploads else None
            packed = None
            if compact and rel.endswith(".safetensors") and size > 0:
                try:
                    packed = _packed_if_smaller(path, Path(tmp) / f"{index}.perp-sparse.safetensors", digest, size)
                except Exception:
                    if previous is not None:
                        previous.result()  # the earlier file's failure, if it failed, is the one to report
                    raise
            if previous is not None:
                previous.result()  # one upload in flight: the scratch directory holds at most two packed files
            if packed is not None:
                uploads.append(_in_background(_upload_and_remove, store, packed[0], packed[1], recorded,
                                              name="perp-upload"))
            else:
                uploads.append(_in_background(_upload_blob, store, path, digest, ENCODING_RAW, recorded,
                                              name="perp-upload"))
        return {rel: upload.result() for (rel, _), upload in zip(files, uploads)}


def _packed_if_smaller(path: Path, packed: Path, digest: str, size: int) -> Optional[tuple[Path, str]]:
    """Pack the safetensors file `path` into the temporary file `packed`; returns (`packed`, its sha256) when it
    is smaller than `size`, else None (and `packed` is removed)."""
    from perp.store.sparse_format import pack_file

    info = pack_file(path, packed, fsync=False)  # a temporary file: uploaded, then removed
    if info["sha256"] != digest:
        raise RegistryError(f"'{path}' changed while it was being registered")
    if info["packed_size"] < size:
        return packed, info["packed_sha256"]  # computed while writing it: no second read
    packed.unlink()
    return None


def _upload_and_remove(store: Store, packed: Path, digest: str, recorded: set[str]) -> dict[str, Any]:
    """Upload a packed temporary file as its blob and remove it; returns its storage record."""
    try:
        return _upload_blob(store, packed, digest, ENCODING_SPARSE, recorded)
    finally:
        packed.unlink(missing_ok=True)


def _upload_blob(store: Store, source: Path, digest: str, encoding: str, recorded: set[str]) -> dict[str, Any]:
    """Upload `source` as the blob `digest`; returns its storage record. A re-used blob is refreshed (so gc
    sees it young) unless it is in `recorded` (see `_blobs_of_latest_version`)."""
    ref = store.put_blob(source, digest, refresh=digest not in recorded)
    return {"encoding": encoding, "blob": ref.sha256, "size": ref.size}


def _manifest(store: Store, name: str, files: dict[str, dict[str, Any]], storage: dict[str, dict[str, Any]],
              described: dict[str, Optional[dict]], flow_run_id: Optional[str]) -> dict[str, Any]:
    """The manifest of a registration: its files, how they are stored, what the caller said, the provenance."""
    return jsonable({
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "files": files,
        "storage": storage,
        "bytes": sum(r["size"] for r in files.values()),
        "stored_bytes": sum(r["size"] for r in storage.values()),
        **described,
        "code": code_version(),
        "dvc_outs": dvc_outs(),
        "prefect_flow_run_id": prefect_flow_run_id(flow_run_id),
        "who": who(store.principal()),
        "when": utc_now(),
    })


def _require_uploads_present(store: Store, name: str, storage: dict[str, dict[str, Any]],
                             manifest_sha256: str) -> None:
    """Refuse the registration when a blob it uploaded or re-used is gone from the store."""
    # A concurrent `gc` may have collected a re-used blob between its upload check and now: look again just
    # before the version becomes visible, so a version never names a missing blob.
    missing = [entry["blob"] for entry in storage.values() if store.head(blob_key(entry["blob"])) is None]
    if missing or store.head(blob_key(manifest_sha256)) is None:
        raise RegistryError(f"{len(missing) or 1} blob(s) of '{name}' vanished while registering (a concurrent "
                            "`perp registry gc`?); nothing was registered; register again")


def _append_registration(store: Store, name: str, manifest: dict[str, Any], manifest_sha256: str,
                         wanted: Optional[dict[str, Any]], *, seen_head: int) -> dict[str, Any]:
    """Append the register event that makes the version visible; returns the registration's result.

    With `wanted` (a reusing registration), a matching version another writer registered after event
    `seen_head` is returned instead and nothing is written.
    """

    def build(current: ModelState) -> dict[str, Any]:
        if wanted is not None:
            raced = [v for v in _reuse_candidates(current) if current.versions[v].seq > seen_head]
            if (twin := _matching_version(store, name, current, wanted, raced)) is not None:
                raise _AlreadyRegistered(twin)
        return {"type": "register", "version": current.next_version, "manifest_sha256": manifest_sha256,
                "files": len(manifest["files"]), "bytes": manifest["bytes"], "stored_bytes": manifest["stored_bytes"]}

    try:
        event, _ = append_event(store, name, build)
    except _AlreadyRegistered as raced:
        return {**raced.manifest, "reused": True}
    result = {**manifest, "version": event["version"], "manifest_sha256": manifest_sha256,
              "event": _event_summary(event)}
    return {**result, "reused": False} if wanted is not None else result


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

    Candidates are the recent active versions and those a stage holds (`_reuse_candidates`); one matches when its
    manifest lists the same files (path, sha256, size) and the same metrics, params, lineage and extra as
    `register_version` would record for these arguments (`metrics` as given, no metrics.json default). Nothing
    is written; an absent store or model is None. Returns the version's manifest + version, like `show`.
    """
    name = validate_name(name)
    store = store_uri if isinstance(store_uri, Store) else open_store(store_uri)
    if not store.exists():
        return None
    _, state = load_state(store, name)
    candidates = _reuse_candidates(state)
    if not candidates:
        return None
    model_dir = Path(model_dir)
    files = _file_records(_model_files(model_dir))
    wanted = _registration_record(files, _dict_or_none(metrics, "metrics"), _dict_or_none(params, "params"),
                                  _dict_or_none(lineage, "lineage"), _dict_or_none(extra, "extra"))
    return _matching_version(store, name, state, wanted, candidates)


#: How many of the newest active versions a re-registration compares against (besides those stages hold).
REUSE_LOOKBACK = 100


def _reuse_candidates(state: ModelState) -> list[int]:
    """Active versions a re-run may return, newest first: the `REUSE_LOOKBACK` newest and every one a stage
    holds (a registry with a long history compares against its recent past, not all of it)."""
    active = {v for v, record in state.versions.items() if not record.deregistered}
    held = {version for stage in state.stacks if (version := state.current(stage)) is not None}
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
        if not isinstance(storage, dict):
            return set()
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
    models: list[dict[str, Any]] = []
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
                       "stages": _held_stages(state),
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
        return {"name": name, "stages": _held_stages(state),
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
    from perp.io.atomic import atomic_directory

    name, selector = parse_ref(ref)
    _require_pack_workers()
    out_dir = Path(out_dir)
    _require_pull_target(out_dir)
    store = _store(store_uri)
    state, version = _pullable_version(store, name, selector)
    manifest = _load_manifest(store, name, state, version)
    files, storage = _manifest_tables(manifest, name, version)
    _require_pull_space(out_dir, files, storage)
    with atomic_directory(out_dir, kind="pull") as staging:
        # Inside the staging directory: a killed pull's packed downloads go with it (`remove_stale_staging`).
        scratch = Path(tempfile.mkdtemp(dir=staging, prefix=".perp-pull-scratch-"))
        try:
            _download_files(store, f"'{name}' v{version}", files, storage, staging, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _write_pull_record(staging, store, ref, state, name, version)
    return {"name": name, "version": version, "ref": ref, "out": str(out_dir), "files": len(files),
            "bytes": manifest["bytes"], "stages": state.stages_of(version),
            "manifest_sha256": state.versions[version].manifest_sha256}


def _require_pull_target(out_dir: Path) -> None:
    """Refuse to pull into anything but an absent or empty directory or a complete perp output."""
    from perp.io.atomic import is_complete

    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_complete(out_dir))):
        raise RegistryError(f"'{out_dir}' exists and is not empty; choose another --out (perp replaces only its own "
                            "complete outputs)")


def _require_pull_space(out_dir: Path, files: dict[str, Any], storage: dict[str, Any]) -> None:
    """The version's files, and the two largest packed downloads (the most in flight at once) beside them."""
    from perp.io.atomic import require_free_space

    def size(entry: Any) -> int:
        value = entry.get("size") if isinstance(entry, dict) else None
        return value if isinstance(value, int) and value > 0 else 0  # a malformed record fails its own check later

    packed = sorted(size(entry) for entry in storage.values()
                    if isinstance(entry, dict) and entry.get("encoding") != "raw")
    require_free_space(out_dir, sum(size(record) for record in files.values()) + sum(packed[-2:]), "--out",
                       "the pulled checkpoint")


def _pullable_version(store: Store, name: str, selector: Union[int, str]) -> tuple[ModelState, int]:
    """The model's state and the active version `selector` names, from a log that lost none of its events."""
    _, state = load_state(store, name)
    _require_model(state, store, name)
    if isinstance(selector, str) and selector != LATEST:
        _require_untruncated(store, name, state, selector)
    return state, _resolve(state, name, selector)


def _manifest_tables(manifest: dict[str, Any], name: str, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A manifest's `files` and `storage`, both keyed by relative path."""
    files, storage = manifest.get("files"), manifest.get("storage")
    if not isinstance(files, dict) or not isinstance(storage, dict):
        raise RegistryIntegrityError(f"manifest of '{name}' v{version} is malformed")
    return files, storage


def _download_files(store: Store, where: str, files: dict[str, Any], storage: dict[str, Any], staging: Path,
                    scratch: Path) -> None:
    """Write every file of the version `where` names into `staging`, in order, each checked against its record.

    The next file's blob downloads in the background while the current packed one is unpacked (network and CPU
    overlap); at most two packed downloads exist at a time in `scratch`. Errors come in file order.
    """
    names = sorted(files)
    downloads: list[Future] = []

    def start(index: int) -> None:
        rel = names[index]
        downloads.append(_in_background(_fetch_blob, store, where, rel, files[rel], storage.get(rel), staging,
                                        scratch / f"{index}.perp-sparse.safetensors", name="perp-download"))

    with _settled_on_error(downloads):
        if names:
            start(0)
        for index, rel in enumerate(names):
            packed = downloads[index].result()
            if index + 1 < len(names):
                start(index + 1)
            _finish_file(where, rel, files[rel], storage[rel], staging / _safe_relpath(rel), packed)


@contextlib.contextmanager
def _blob_errors(where: str, rel: str, entry: dict[str, Any]) -> Iterator[None]:
    """Store errors about a file's blob, as registry integrity errors naming the file and the version."""
    try:
        yield
    except StoreNotFound:
        raise RegistryIntegrityError(f"file '{rel}' of {where} ({blob_key(entry['blob'])}) is missing from the "
                                     "store") from None
    except StoreIntegrityError as error:
        raise RegistryIntegrityError(f"file '{rel}' of {where}: {error}") from None


def _fetch_blob(store: Store, where: str, rel: str, record: Any, entry: Any, staging: Path,
                packed: Path) -> Optional[Path]:
    """Download the blob of the file `rel` (`record`: its sha256 and size as registered; `entry`: how it is
    stored): a raw file straight to its place in `staging`; a packed one to `packed`, returned for unpacking."""
    target = staging / _safe_relpath(rel)
    if not isinstance(entry, dict) or not isinstance(record, dict):
        raise RegistryIntegrityError(f"manifest of {where}: '{rel}' has no storage record")
    with _blob_errors(where, rel, entry):
        if entry["encoding"] == ENCODING_RAW:
            if entry["blob"] != record["sha256"]:
                raise RegistryIntegrityError(f"manifest of {where}: '{rel}' is inconsistent")
            store.get_blob(entry["blob"], target)
            return None
        if entry["encoding"] == ENCODING_SPARSE:
            return store.get_blob(entry["blob"], packed)
    raise RegistryError(f"'{rel}' of {where} uses encoding '{entry['encoding']}', which this perp cannot read; "
                        "upgrade perp")


def _finish_file(where: str, rel: str, record: dict[str, Any], entry: dict[str, Any], target: Path,
                 packed: Optional[Path]) -> None:
    """Rebuild a packed file at `target` (removing the download), then check the file's size against its record."""
    from perp.store.sparse_format import unpack_file

    if packed is not None:
        with _blob_errors(where, rel, entry):
            unpack_file(packed, target, expected_sha256=record["sha256"])
        packed.unlink()
    if target.stat().st_size != record["size"]:
        raise RegistryIntegrityError(f"file '{rel}' of {where} has the wrong size")


def _write_pull_record(staging: Path, store: Store, ref: str, state: ModelState, name: str, version: int) -> None:
    """Record in the pulled directory which version it holds, from where, and the log head it was read at."""
    record = {"name": name, "version": version, "ref": ref, "store": scrub_secrets(store.describe()),
              "manifest_sha256": state.versions[version].manifest_sha256,
              "stages": state.stages_of(version), "head": {"seq": state.head_seq, "hash": state.head_hash},
              "pulled": utc_now()}
    (staging / PULL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


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
    problems = _stray_models(store) if name is None else []
    checked = {"events": 0, "manifests": 0, "blobs": 0, "bytes": 0}
    checks = _Checks(store, deep, checked)
    models: dict[str, Any] = {}
    seen_hashes: set[Any] = set()
    for model in names:
        events, state, model_problems = _verify_model(store, model, name is not None, checks)
        problems += model_problems
        if events:
            models[model] = {"events": len(events), "head_hash": state.head_hash, "versions": len(state.versions),
                             "stages": _held_stages(state)}
            seen_hashes.update(event.get("hash") for event in events)
    problems += _missing_anchors(name, anchors, seen_hashes)
    problems = [{"seq": None, "version": None, "file": None, **problem} for problem in problems]
    return {"ok": not problems, "store": store.describe(), "deep": deep, "models": models, "checked": checked,
            "problems": problems}


@dataclass
class _Checks:
    """What one `verify` has checked: the counts it reports, and each blob's result (a blob is checked once,
    however many versions name it)."""

    store: Store
    deep: bool
    counts: dict[str, int]
    blobs: dict[str, Optional[str]] = field(default_factory=dict)  # sha -> problem message or None

    def blob_problem(self, digest: str, size: Any) -> Optional[str]:
        if digest not in self.blobs:
            self.blobs[digest] = _check_blob(self.store, digest, size, self.deep, self.counts)
        return self.blobs[digest]


def _stray_models(store: Store) -> list[dict[str, Any]]:
    """A problem for every key under models/ that is not a valid model name."""
    return [{"kind": "stray_key", "name": stray, "key": f"models/{stray}",
             "message": f"models/{stray} is not a valid model name"}
            for stray in store.list_children(models_prefix()) if not _is_name(stray)]


def _verify_model(store: Store, model: str, named: bool,
                  checks: _Checks) -> tuple[list[dict[str, Any]], ModelState, list[dict[str, Any]]]:
    """One model's events, the state they replay to, and its problems: the log, each version's manifest and
    files, the stage pointers. A model the caller `named` must exist."""
    events, log_problems = scan_log(store, model)
    if not events and not log_problems and named:
        raise RegistryError(f"model '{model}' not found in {store.describe()}")
    problems = [{"kind": p.kind, "name": model, "key": p.key, "seq": p.seq, "message": p.message}
                for p in log_problems]
    checks.counts["events"] += len(events)
    state, replay_problems = _replay_reporting(model, events)
    problems += replay_problems
    for number, record in sorted(state.versions.items()):
        problems += _verify_version(store, model, number, record, checks)
    problems += _pointer_problems(store, model, state)
    return events, state, problems


def _replay_reporting(model: str, events: list[dict[str, Any]]) -> tuple[ModelState, list[dict[str, Any]]]:
    """The state `events` replay to, skipping each event the state forbids or cannot read, and a problem for each."""
    state = ModelState(model)
    problems: list[dict[str, Any]] = []
    for event in events:
        try:
            state.apply(event)
        except (RegistryIntegrityError, KeyError, TypeError) as error:
            seq = event.get("seq")
            message = str(error) if isinstance(error, RegistryIntegrityError) else \
                f"event {seq} of '{model}' is malformed ({type(error).__name__}: {error})"
            problems.append({"kind": "event_invalid", "name": model, "key": event_key(model, seq)
                             if isinstance(seq, int) else "", "seq": seq, "message": message})
    return state, problems


def _verify_version(store: Store, model: str, number: int, record: VersionState,
                    checks: _Checks) -> list[dict[str, Any]]:
    """The problems of one version: its manifest, then every file the manifest stores."""
    storage, problems = _manifest_storage(store, model, number, record, checks.counts)
    if storage is None:
        return problems
    where, key = f"'{model}' v{number}", blob_key(record.manifest_sha256)
    for rel, entry in sorted(storage.items()):
        digest = entry.get("blob", "")
        try:
            bkey = blob_key(digest)
        except StoreError:
            problems.append({"kind": "manifest_invalid", "name": model, "version": number, "file": rel,
                             "key": key, "message": f"manifest of {where} names an invalid blob for '{rel}'"})
            continue
        message = checks.blob_problem(digest, entry.get("size"))
        if message:
            kind = "blob_missing" if "missing" in message else "blob_altered"
            problems.append({"kind": kind, "name": model, "version": number, "file": rel, "key": bkey,
                             "message": f"file '{rel}' of {where} ({bkey}) {message}"})
    return problems


def _manifest_storage(store: Store, model: str, number: int, record: VersionState,
                      checked: dict[str, int]) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]]]:
    """A version's manifest's storage record and no problem, or None and the problem that keeps it from being
    read."""
    where = f"'{model}' v{number}"
    key = blob_key(record.manifest_sha256)
    try:
        manifest = json.loads(store.get_blob_bytes(record.manifest_sha256))
        checked["manifests"] += 1
    except StoreNotFound:
        return None, [{"kind": "manifest_missing", "name": model, "version": number, "key": key,
                       "message": f"manifest of {where} ({key}) is missing"}]
    except (StoreIntegrityError, ValueError):
        return None, [{"kind": "manifest_altered", "name": model, "version": number, "key": key,
                       "message": f"manifest of {where} ({key}) was altered: its content no longer "
                                  f"matches the sha256 recorded by event {record.seq}"}]
    storage = manifest.get("storage") if isinstance(manifest, dict) else None
    if not isinstance(storage, dict) or not all(isinstance(e, dict) for e in storage.values()):
        return None, [{"kind": "manifest_invalid", "name": model, "version": number, "key": key,
                       "message": f"manifest of {where} ({key}) is malformed"}]
    return storage, []


def _pointer_problems(store: Store, model: str, state: ModelState) -> list[dict[str, Any]]:
    """The problems of a model's stage pointers: each stage's against the log, then any with no event behind it."""
    problems = [problem for stage in sorted(state.stacks)
                if (problem := _pointer_problem(store, model, state, stage)) is not None]
    for child in store.list_children(stages_prefix(model)):
        stage = child[:-len(".json")] if child.endswith(".json") else child
        if stage not in state.stacks:
            key = f"{stages_prefix(model)}/{child}"
            problems.append({"kind": "pointer_altered", "name": model, "key": key,
                             "message": f"stage pointer {key} has no event behind it: it was planted"})
    return problems


def _pointer_problem(store: Store, model: str, state: ModelState, stage: str) -> Optional[dict[str, Any]]:
    """What is wrong with a stage's pointer, compared with the stage's last event in the log; None if nothing."""
    key = pointer_key(model, stage)
    pointer, _ = read_pointer(store, model, stage)
    seq, digest = state.stage_events[stage]
    expected = state.current(stage)
    if pointer is None:
        return {"kind": "pointer_missing", "name": model, "key": key, "message":
                f"stage pointer {key} is missing; the log puts version {expected} there "
                f"(event {seq}); the next registry write restores it"}
    if isinstance(pointer.get("seq"), int) and _log_lost(store, model, state.head_seq, pointer["seq"]):
        return {"kind": "log_truncated", "name": model, "key": key,
                "message": _truncation(model, key, pointer["seq"], state.head_seq)}
    if isinstance(pointer.get("seq"), int) and pointer["seq"] > state.head_seq:
        return None  # a write landed after the log was read: the pointer is ahead of this read, not wrong
    if (pointer.get("version"), pointer.get("seq")) == (expected, seq) and pointer.get("event_hash") != digest:
        return {"kind": "pointer_altered", "name": model, "key": key,
                "message": f"stage pointer {key} records another hash for event {seq} than the log "
                           f"holds: event {seq} ({event_key(model, seq)}) or the pointer was altered"}
    if (pointer.get("version"), pointer.get("seq"), pointer.get("event_hash")) != (expected, seq, digest):
        stale = isinstance(pointer.get("seq"), int) and pointer["seq"] < seq
        return {"kind": "pointer_stale" if stale else "pointer_altered", "name": model, "key": key,
                "message": f"stage pointer {key} says version {pointer.get('version')} "
                           f"(event {pointer.get('seq')}), the log says version {expected} "
                           f"(event {seq})" + ("; a writer stopped before moving it, the next "
                                               "registry write repairs it" if stale else
                                               ": the pointer was altered")}
    return None


def _missing_anchors(name: Optional[str], anchors: Optional[list[str]], seen: set[Any]) -> list[dict[str, Any]]:
    """A problem for every anchored event hash that is not among the `seen` hashes of the log."""
    return [{"kind": "anchor_missing", "name": name, "key": "", "message":
             f"anchored event {anchor} is not in the log: the history was rewritten or truncated"}
            for anchor in anchors or [] if anchor not in seen]


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
