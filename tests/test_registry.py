"""The model registry, against the local backend and a real S3 API (a moto server on 127.0.0.1).

Covers the round trip, gates and forced promotions, rollback, bad input (nothing written), tampering found by
`verify`, corrupted objects, uploads killed halfway, and promotions racing from several processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from pathlib import Path

import boto3
import pytest

from perp.config import GatesConfig
from perp.errors import OutputError
from perp.models.loading import model_content_hash
from perp.io.hashing import sha256_file
from perp.registry import (
    GateRefused,
    RegistryError,
    RegistryIntegrityError,
    deregister,
    find_version,
    gc,
    history,
    list_models,
    promote,
    pull,
    register_version,
    rollback,
    show,
    verify,
)
from perp.registry.events import event_hash, event_key, pointer_key
from perp.store import StoreUnreachable, blob_key, open_store
from perp.store.testing import cached_pruned_tiny, free_port, moto_s3

BUCKET = "perp-registry-test"


def measured_on(model_dir: Path, metrics: dict) -> dict:
    """`metrics` as perp evaluate writes them for `model_dir`: naming the checkpoint they were measured on."""
    return {**metrics, "model": {"sha256": model_content_hash(model_dir)}}


FIGURES = {"sparsity": 0.5, "target_sparsity": 0.5,
           "perplexity": {"wiki": {"ppl": 20.0, "dense_ppl": 18.0, "ratio": 1.11}},
           "zeroshot": {"mean_acc": 0.5, "dense_mean_acc": 0.51, "drop_points": 1.0},
           "gates": {"ppl_ratio": 1.11, "zeroshot_drop_points": 1.0, "sparsity": 0.5}}
GOOD = measured_on(cached_pruned_tiny(), FIGURES)  # the `model_dir` fixture's checkpoint
BAD = {**GOOD, "gates": {"ppl_ratio": 1.5, "zeroshot_drop_points": 3.5, "sparsity": 0.5}}
LINEAGE = {"base_model": {"source": "smollm2-135m", "sha256": "ab" * 32}, "calibration_sha256": "cd" * 32,
           "training_data_sha256": "ef" * 32, "prune": {"method": "wanda", "sparsity": 0.5},
           "recover": {"method": "norm"}}


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3((BUCKET,)) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def model_dir():
    return cached_pruned_tiny()


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store")
    monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def store_keys(uri):
    store = open_store(uri)
    return store.list_keys("") if uri.startswith("s3://") or Path(uri).exists() else []


def overwrite(uri, key, data: bytes):
    """Change an object behind the registry's back (what an attacker or a bad disk would do)."""
    store = open_store(uri)
    if uri.startswith("s3://"):
        boto3.client("s3", endpoint_url=store.endpoint_url).put_object(
            Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)
    else:
        (Path(uri) / key).write_bytes(data)


def delete(uri, key):
    store = open_store(uri)
    if uri.startswith("s3://"):
        boto3.client("s3", endpoint_url=store.endpoint_url).delete_object(Bucket=store.bucket,
                                                                          Key=f"{store.prefix}/{key}")
    else:
        (Path(uri) / key).unlink()


def tree_sha(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def to_prod(uri, version):
    for stage in ("dev", "staging", "prod"):
        promote(uri, "tiny", version, stage, reason=f"ship v{version}")


# --------------------------------------------------------------------------------------------- round trip


def test_register_promote_pull_round_trip(store_uri, model_dir, tmp_path):
    manifest = register_version(store_uri, "tiny", model_dir, GOOD, {"prune": {"sparsity": 0.5}}, LINEAGE)
    assert manifest["version"] == 1 and manifest["event"]["seq"] == 1
    assert manifest["files"] == {k: {"sha256": v, "size": (model_dir / k).stat().st_size}
                                 for k, v in tree_sha(model_dir).items()}
    assert manifest["storage"]["model.safetensors"]["encoding"] == "perp-sparse/1"
    assert manifest["stored_bytes"] < manifest["bytes"]
    assert manifest["lineage"] == LINEAGE and manifest["metrics"] == GOOD
    principal = {"principal"} if store_uri.startswith("s3://") else set()  # the ARN STS authenticated
    assert manifest["code"]["perp_version"] and set(manifest["who"]) == {"user", "host"} | principal
    assert manifest["when"].endswith("Z")
    assert register_version(store_uri, "tiny", model_dir, GOOD)["version"] == 2

    to_prod(store_uri, 1)
    result = promote(store_uri, "tiny", 2, "dev")
    assert result["previous_version"] == 1 and not result["forced"]

    out = tmp_path / "pulled"
    pulled = pull(store_uri, "tiny@prod", out)
    assert pulled["version"] == 1 and tree_sha(out) == tree_sha(model_dir)
    record = json.loads((out / ".perp-registry.json").read_text())
    assert record["version"] == 1 and record["manifest_sha256"] == manifest["manifest_sha256"]
    assert pull(store_uri, "tiny@2", out)["version"] == 2  # replaces its own previous output
    assert pull(store_uri, "tiny@latest", tmp_path / "latest")["version"] == 2

    assert list_models(store_uri) == [{"name": "tiny", "versions": 2, "latest": 2, "events": 6,
                                       "stages": {"dev": 2, "prod": 1, "staging": 1},
                                       "updated": history(store_uri, "tiny")[-1]["when"]}]
    summary = show(store_uri, "tiny")
    assert [v["stages"] for v in summary["versions"]] == [["prod", "staging"], ["dev"]]
    assert show(store_uri, "tiny", "prod")["version"] == 1
    assert show(store_uri, "tiny", 2)["manifest_sha256"]
    events = history(store_uri, "tiny")
    assert [(e["type"], e.get("stage"), e["version"]) for e in events] == [
        ("register", None, 1), ("register", None, 2), ("promote", "dev", 1), ("promote", "staging", 1),
        ("promote", "prod", 1), ("promote", "dev", 2)]
    assert all(e["prev_hash"] == p["hash"] for p, e in zip(events, events[1:]))
    assert [e["seq"] for e in history(store_uri, "tiny", stage="dev")] == [3, 6]
    report = verify(store_uri)
    assert report["ok"], report["problems"]
    assert report["checked"]["events"] == 6 and report["checked"]["manifests"] == 2


def test_find_version_returns_only_an_active_version_with_exactly_this_content(store_uri, model_dir, tmp_path):
    params = {"prune": {"sparsity": 0.5}}
    assert find_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE) is None
    assert store_keys(store_uri) == []  # looking never creates a store
    first = register_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE)
    found = find_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE)
    assert found["version"] == 1 and found["manifest_sha256"] == first["manifest_sha256"]
    assert found["files"] == first["files"] and found["metrics"] == GOOD

    assert find_version(store_uri, "tiny", model_dir, BAD, params, LINEAGE) is None
    assert find_version(store_uri, "tiny", model_dir, GOOD, {"prune": {"sparsity": 0.6}}, LINEAGE) is None
    assert find_version(store_uri, "tiny", model_dir, GOOD, params, {**LINEAGE, "calibration_sha256": "0" * 64}) is None
    changed = _copy_with_extra(model_dir, tmp_path / "changed", size=10)
    assert find_version(store_uri, "tiny", changed, GOOD, params, LINEAGE) is None  # one more file
    assert find_version(store_uri, "other", model_dir, GOOD, params, LINEAGE) is None

    deregister(store_uri, "tiny", 1, reason="withdrawn")
    assert find_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE) is None
    events = history(store_uri, "tiny")
    assert [e["type"] for e in events] == ["register", "deregister"]  # finding wrote nothing


def test_identical_registration_that_races_an_upload_is_registered_once(store_uri, model_dir, monkeypatch):
    """The other writer finishes between this one's reuse check and its append: its version is returned."""
    import perp.registry.api as api

    params = {"prune": {"sparsity": 0.5}}
    real = api._blobs_of_latest_version
    raced: dict = {}

    def other_writer_finishes_first(store, name, state):  # called once the log is read, before the upload
        monkeypatch.setattr(api, "_blobs_of_latest_version", real)
        raced["first"] = register_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE, reuse=True)
        raced["different"] = register_version(store_uri, "tiny", model_dir, BAD, params, LINEAGE, reuse=True)
        return real(store, name, state)

    monkeypatch.setattr(api, "_blobs_of_latest_version", other_writer_finishes_first)
    second = register_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE, reuse=True)
    assert raced["first"]["reused"] is False and raced["first"]["version"] == 1
    assert raced["different"]["reused"] is False and raced["different"]["version"] == 2
    assert second["reused"] is True and second["version"] == 1
    assert second["manifest_sha256"] == raced["first"]["manifest_sha256"]
    assert [(e["type"], e["version"]) for e in history(store_uri, "tiny")] == [("register", 1), ("register", 2)]

    monkeypatch.setattr(api, "_blobs_of_latest_version", other_writer_finishes_first)
    explicit = register_version(store_uri, "tiny", model_dir, GOOD, params, LINEAGE)  # no reuse asked: a new version
    assert explicit["version"] == 3 and "reused" not in explicit
    assert raced["first"]["reused"] and raced["different"]["reused"]  # found when they read the log
    assert verify(store_uri)["ok"]


def test_gate_refusal_then_forced_promotion(store_uri, model_dir):
    register_version(store_uri, "tiny", model_dir, BAD)
    promote(store_uri, "tiny", 1, "dev")
    promote(store_uri, "tiny", 1, "staging")  # no gates on staging by default
    before = store_keys(store_uri)
    with pytest.raises(GateRefused) as refusal:
        promote(store_uri, "tiny", 1, "prod", reason="try")
    message = str(refusal.value)
    assert "gate ppl_ratio failed" in message and "1.5 exceeds the maximum 1.25 by 0.25" in message
    assert "gate zeroshot_drop failed" in message and "3.5 exceeds the maximum 2 by 1.5" in message
    assert "sparsity" not in refusal.value.evaluation["failed"]
    with pytest.raises(RegistryError, match="--force needs a reason"):
        promote(store_uri, "tiny", 1, "prod", force=True, reason="  ")
    assert store_keys(store_uri) == before  # nothing written by either refusal

    forced = promote(store_uri, "tiny", 1, "prod", reason="incident 42: hotfix", force=True)
    assert forced["forced"] and forced["failed_gates"] == ["ppl_ratio", "zeroshot_drop"]
    event = history(store_uri, "tiny", stage="prod")[-1]
    assert event["forced"] and event["reason"] == "incident 42: hotfix"
    assert event["failed_gates"] == ["ppl_ratio", "zeroshot_drop"]
    by_gate = {c["gate"]: c for c in event["gates"]["checks"]}
    assert by_gate["ppl_ratio"]["value"] == 1.5 and by_gate["ppl_ratio"]["threshold"] == 1.25
    assert by_gate["ppl_ratio"]["by"] == pytest.approx(0.25) and by_gate["sparsity"]["passed"]
    assert verify(store_uri)["ok"]


def test_promotion_follows_the_policy_the_version_was_registered_under(tmp_path, model_dir):
    """Stages and gates passed by the caller cannot quietly loosen the policy recorded at registration."""
    from perp.config import dump_params, load_params

    uri = str(tmp_path / "store")
    params = dump_params(load_params(None, ["register.gates.prod.max_zeroshot_drop=null"]))  # dev → staging →
    register_version(uri, "tiny", model_dir, BAD, params)  # prod, a perplexity gate on prod (not the defaults)
    with pytest.raises(RegistryError, match=r"differs from the one it was registered under \(stages \['dev', "
                                            r"'staging', 'prod'\] → \['prod'\]; gates\.prod \{.*max_ppl_ratio: "
                                            r"1\.25.*\} → none\)"):
        promote(uri, "tiny", 1, "prod", stages=["prod"], gates={"prod": None})  # skip the ladder and the gates
    with pytest.raises(RegistryError, match=r"gates\.prod \{.*max_ppl_ratio: 1\.25.*\} → \{.*max_ppl_ratio: 1000"):
        promote(uri, "tiny", 1, "dev", gates={"prod": GatesConfig(max_ppl_ratio=1000)})
    assert [e["type"] for e in history(uri, "tiny")] == ["register"]  # nothing recorded

    assert promote(uri, "tiny", 1, "dev")["stage"] == "dev"  # no policy given: the recorded one applies
    register = params["register"]
    rollback(uri, "tiny", "dev", reason="again, with the stages alone")
    promote(uri, "tiny", 1, "dev", stages=register["stages"])  # what is left out is the recorded policy's
    promote(uri, "tiny", 1, "staging", stages=register["stages"], gates=register["gates"])  # the same: no override
    with pytest.raises(GateRefused, match="gate ppl_ratio failed"):
        promote(uri, "tiny", 1, "prod")  # BAD fails the recorded prod gates
    forced = promote(uri, "tiny", 1, "prod", gates={"prod": None}, force=True, reason="incident 7: hotfix")
    assert forced["forced"] and forced["failed_gates"] == []
    event = history(uri, "tiny")[-1]
    assert event["forced"] and event["reason"] == "incident 7: hotfix"
    assert event["policy"]["source"] == "caller" and "differs" in event["policy"]["override"]
    assert event["policy"]["registered"]["gates"]["prod"]["max_ppl_ratio"] == 1.25 and event["policy"]["gates"] == {}
    assert history(uri, "tiny")[1]["policy"]["source"] == "registration"
    assert verify(uri)["ok"]


def test_gates_follow_the_stage_order_and_config(tmp_path, model_dir):
    uri = str(tmp_path / "store")
    register_version(uri, "tiny", model_dir, measured_on(model_dir, {"gates": {"ppl_ratio": 1.1}}))  # no zero-shot,
    # no target sparsity
    with pytest.raises(GateRefused, match="was never promoted to 'dev'"):
        promote(uri, "tiny", 1, "staging")
    gates = {"qa": GatesConfig(max_ppl_ratio=1.2, max_zeroshot_drop=None, min_sparsity=None)}
    with pytest.raises(GateRefused, match="no sparsity target"):
        promote(uri, "tiny", 1, "qa", stages=["qa"], gates=gates)
    gates["qa"] = GatesConfig(max_ppl_ratio=1.2, max_zeroshot_drop=None, min_sparsity=0.4)
    with pytest.raises(GateRefused, match=r"achieved sparsity not measured"):
        promote(uri, "tiny", 1, "qa", stages=["qa"], gates=gates)
    gates_off = {"qa": {"max_ppl_ratio": 1.2, "max_zeroshot_drop": None, "min_sparsity": 0.0}}
    with pytest.raises(GateRefused):
        promote(uri, "tiny", 1, "qa", stages=["qa"], gates=gates_off)  # sparsity missing still fails closed
    assert promote(uri, "tiny", 1, "qa", stages=["qa"], gates={"qa": None})["stage"] == "qa"


def test_sparsity_gate_uses_the_planned_sparsity_when_metrics_have_it():
    from perp.registry.gates import evaluate_gates

    gates = GatesConfig(max_ppl_ratio=None, max_zeroshot_drop=None, min_sparsity=None)
    planned = 38 / 64  # floor(0.6 × 64) per row of 64 inputs: 0.59375, not 0.6

    def check(achieved: float, **extra: float) -> dict:
        metrics = {"target_sparsity": 0.6, "gates": {"sparsity": achieved}, **extra}
        return evaluate_gates("prod", ["prod"], gates, metrics, set())

    assert not check(planned)["passed"]  # metrics without planned_sparsity: the nominal target (older behaviour)
    result = check(planned, planned_sparsity=planned)
    assert result["passed"] and result["checks"][0]["planned"] == planned and result["checks"][0]["target"] == 0.6
    result = check(planned - 1 / (64 * 64), planned_sparsity=planned)  # one weight of a 64×64 Linear un-zeroed
    assert result["failed"] == ["sparsity"] and "below the minimum" in result["checks"][0]["detail"]


def test_sparsity_gate_compares_whole_counts_exactly():
    from perp.registry.gates import evaluate_gates

    gates = GatesConfig(max_ppl_ratio=None, max_zeroshot_drop=None, min_sparsity=None)
    total, planned = 106_168_320, 53_084_160

    def check(zeros: int) -> dict:
        metrics = {"target_sparsity": 0.5, "planned_sparsity": planned / total, "planned_pruned_weights": planned,
                   "model": {"decoder_linear_zeros": zeros, "decoder_linear_weights": total},
                   "gates": {"sparsity": zeros / total}}
        return evaluate_gates("prod", ["prod"], gates, metrics, set())

    assert check(planned)["passed"]
    # one un-zeroed weight out of 10^8: within any float tolerance on the fraction, caught on the counts
    failed = check(planned - 1)
    assert failed["failed"] == ["sparsity"] and failed["checks"][0]["metric"] == "model.decoder_linear_zeros"


def test_a_full_disk_refuses_registration_and_pull_before_any_transfer(model_dir, tmp_path, full_disk, monkeypatch):
    store_uri = str(tmp_path / "store")
    disk = full_disk(tmp_path / "disk")
    monkeypatch.setenv("PERP_CACHE", str(disk / "cache"))  # where packing's scratch goes
    with pytest.raises(OutputError, match="packing the two largest files needs about .* point PERP_CACHE"):
        register_version(store_uri, "tiny", model_dir, GOOD)
    assert store_keys(store_uri) == []

    monkeypatch.setenv("PERP_CACHE", str(tmp_path / "cache"))
    register_version(store_uri, "tiny", model_dir, GOOD)
    with pytest.raises(OutputError, match="the pulled checkpoint needs about .* free"):
        pull(store_uri, "tiny@latest", disk / "pulled")
    assert sorted(path.name for path in disk.iterdir()) == ["cache"]  # no output, staging or scratch left
    monkeypatch.setenv("PERP_CACHE", str(disk / "cache"))
    assert register_version(store_uri, "tiny", model_dir, GOOD, reuse=True)["reused"]  # packs nothing: no check


def test_register_refuses_when_a_blob_vanishes_before_the_version_is_visible(tmp_path, model_dir, monkeypatch):
    """A concurrent gc collecting a re-used blob must not leave a version that names a missing blob."""
    uri = str(tmp_path / "store")
    store = open_store(uri)
    real = type(store).put_blob_bytes

    def put_manifest_after_gc(self, data, **kwargs):
        for path in (Path(uri) / "blobs").rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                path.unlink()  # what gc would do to the file blobs
                break
        return real(self, data, **kwargs)

    monkeypatch.setattr(type(store), "put_blob_bytes", put_manifest_after_gc)
    with pytest.raises(RegistryError, match="vanished while registering"):
        register_version(uri, "tiny", model_dir, GOOD)
    monkeypatch.undo()
    assert list_models(uri) == []  # no version became visible
    assert register_version(uri, "tiny", model_dir, GOOD)["version"] == 1


def test_a_pointer_write_that_fails_after_the_event_is_recorded_is_a_warning(tmp_path, model_dir, monkeypatch):
    """The rollback is in the log: reporting failure would make the operator's retry roll back a second version."""
    from perp.registry.events import PointerLagWarning
    from perp.store import StoreUnreachable
    from perp.store.local import LocalStore

    uri = str(tmp_path / "store")
    for _ in range(3):
        register_version(uri, "tiny", model_dir, GOOD)
    for version in (1, 2, 3):
        to_prod(uri, version)
    real_put = LocalStore.put_bytes

    def pointers_unreachable(self, key, data, **kwargs):
        if "/stages/" in key:
            raise StoreUnreachable("store unreachable (simulated outage)")
        return real_put(self, key, data, **kwargs)

    monkeypatch.setattr(LocalStore, "put_bytes", pointers_unreachable)
    with pytest.warns(PointerLagWarning, match="rollback event .* is recorded, but a stage pointer could not"):
        assert rollback(uri, "tiny", "prod", reason="v3 broken")["version"] == 2
    assert show(uri, "tiny")["stages"]["prod"] == 2
    assert json.loads((Path(uri) / pointer_key("tiny", "prod")).read_text())["version"] == 3  # lagging
    assert any(p["kind"] != "pointer_missing" and "pointer" in p["kind"] for p in verify(uri)["problems"])

    monkeypatch.setattr(LocalStore, "put_bytes", real_put)
    promote(uri, "tiny", 1, "dev", reason="next write")  # any later write brings every pointer up to date
    assert json.loads((Path(uri) / pointer_key("tiny", "prod")).read_text())["version"] == 2
    assert verify(uri)["ok"]


def test_rollback_walks_back_and_deregister_guards(tmp_path, model_dir):
    uri = str(tmp_path / "store")
    for _ in range(3):
        register_version(uri, "tiny", model_dir, GOOD)
    for version in (1, 2, 3):
        to_prod(uri, version)
    with pytest.raises(RegistryError, match="rollback needs a reason"):
        rollback(uri, "tiny", "prod")
    assert rollback(uri, "tiny", "prod", reason="v3 regressed")["version"] == 2
    with pytest.raises(RegistryError, match="is in prod"):
        deregister(uri, "tiny", 2, reason="bad")
    with pytest.raises(RegistryError, match="is in dev, staging"):
        deregister(uri, "tiny", 3, reason="regressed")
    promote(uri, "tiny", 1, "dev", reason="back to v1")
    promote(uri, "tiny", 1, "staging", reason="back to v1")
    with pytest.raises(RegistryError, match="deregister needs a reason"):
        deregister(uri, "tiny", 3)
    assert deregister(uri, "tiny", 3, reason="regressed")["version"] == 3
    # v3 leaves every stage's history: staging [1, 2, 3, 1] rolls back to 2, not to the withdrawn 3.
    assert rollback(uri, "tiny", "staging", reason="undo")["version"] == 2
    with pytest.raises(RegistryError, match="deregistered"):
        promote(uri, "tiny", 3, "dev", reason="again")
    with pytest.raises(RegistryError, match="deregistered"):
        pull(uri, "tiny@3", tmp_path / "out")
    assert rollback(uri, "tiny", "prod", reason="v2 too")["version"] == 1
    assert pull(uri, "tiny@prod", tmp_path / "out")["version"] == 1
    pointer = json.loads((Path(uri) / pointer_key("tiny", "prod")).read_text())
    last = history(uri, "tiny", stage="prod")[-1]
    assert (pointer["version"], pointer["seq"]) == (1, last["seq"]) == (last["version"], last["seq"])
    assert show(uri, "tiny", 3)["deregistered"] and verify(uri)["ok"]

    # Rolling back a stage's first version withdraws it: the stage is empty and pulling it is refused.
    emptied = rollback(uri, "tiny", "prod", reason="v1 is bad too")
    assert emptied["version"] is None and emptied["previous_version"] == 1
    assert show(uri, "tiny")["stages"].get("prod") is None
    with pytest.raises(RegistryError, match=r"'tiny' has no version in stage 'prod' \(its last version was rolled "
                                            r"back\) \(stages in use: dev, staging\)"):
        pull(uri, "tiny@prod", tmp_path / "out2")
    with pytest.raises(RegistryError, match="holds no version: nothing to roll back"):
        rollback(uri, "tiny", "prod", reason="again")
    assert json.loads((Path(uri) / pointer_key("tiny", "prod")).read_text())["version"] is None
    assert verify(uri)["ok"]
    assert promote(uri, "tiny", 1, "prod", reason="fixed after all")["previous_version"] is None


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error_and_writes_nothing(store_uri, model_dir, tmp_path):
    register_version(store_uri, "tiny", model_dir, GOOD)
    before = store_keys(store_uri)
    cases = [
        (lambda: promote(store_uri, "tiny", 7, "dev"), "has no version 7"),
        (lambda: promote(store_uri, "tiny", 1, "qa"), r"unknown stage 'qa' \(allowed: dev, staging, prod\)"),
        (lambda: promote(store_uri, "tiny", 1, "prod", force=True), "--force needs a reason"),
        (lambda: promote(store_uri, "missing", 1, "dev"), "model 'missing' not found"),
        (lambda: promote(store_uri, "../tiny", 1, "dev"), "not a valid model name"),
        (lambda: promote(store_uri, "a/b", 1, "dev"), "not a valid model name"),
        (lambda: promote(store_uri, "x" * 200, 1, "dev"), "not a valid model name"),
        (lambda: promote(store_uri, "tiny", "-1", "dev"), "not a version number"),
        (lambda: promote(store_uri, "tiny", 0, "dev"), "out of range"),
        (lambda: promote(store_uri, "tiny", 1, "../prod"), "not a valid stage name"),
        (lambda: rollback(store_uri, "tiny", "prod", reason="x"), "holds no version"),
        (lambda: register_version(store_uri, "..", model_dir), "not a valid model name"),
        (lambda: register_version(store_uri, "tiny", tmp_path / "nope"), "does not exist"),
        (lambda: register_version(store_uri, "tiny", model_dir, metrics=[1]), "metrics must be a mapping"),
        (lambda: pull(store_uri, "tiny@qa", tmp_path / "o"), "no version in stage 'qa'"),
        (lambda: pull(store_uri, "tiny@1/../x", tmp_path / "o"), "not a valid stage name"),
        (lambda: show(store_uri, "tiny", 9), "has no version 9"),
    ]
    for call, message in cases:
        with pytest.raises(RegistryError, match=message):
            call()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="exists and is not empty"):
        pull(store_uri, "tiny@1", occupied)
    assert (occupied / "keep.txt").read_text() == "mine"
    assert store_keys(store_uri) == before
    assert not (tmp_path / "o").exists()


def test_requests_against_an_absent_local_store_fail_naming_it_and_create_nothing(tmp_path, model_dir):
    """A typo'd local store path is an error, not an empty registry; only a registration creates a store."""
    uri = str(tmp_path / "never")
    calls = [
        lambda: list_models(uri), lambda: verify(uri), lambda: show(uri, "tiny"), lambda: history(uri, "tiny"),
        lambda: pull(uri, "tiny@prod", tmp_path / "out"), lambda: promote(uri, "tiny", 1, "dev"),
        lambda: rollback(uri, "tiny", "prod", reason="x"), lambda: deregister(uri, "tiny", 1, reason="x"),
        lambda: list_models(open_store(f"file://{uri}")), lambda: gc(uri), lambda: gc(uri, dry_run=False),
    ]
    for call in calls:
        with pytest.raises(RegistryError) as info:
            call()
        message = str(info.value)
        assert f"store '{uri}' does not exist" in message and "\n" not in message, message
    assert not (tmp_path / "never").exists() and not (tmp_path / "out").exists()

    assert register_version(uri, "tiny", model_dir, GOOD)["version"] == 1  # writing creates it
    assert [m["name"] for m in list_models(uri)] == ["tiny"] and verify(uri)["ok"]


def test_unreachable_endpoint_fails_clearly_after_retries(model_dir):
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = open_store(f"s3://{BUCKET}/x", endpoint_url=endpoint, max_attempts=2)
    with pytest.raises(StoreUnreachable, match=f"{endpoint} unreachable after 2 attempts"):
        promote(store, "tiny", 1, "dev")
    with pytest.raises(StoreUnreachable, match=endpoint):
        register_version(store, "tiny", model_dir, GOOD)


def test_secrets_never_reach_the_store(store_uri, model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "perp-secret-8c1f")  # moto accepts any; it must not be stored
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  mask:\n    cmd: perp prune\n    outs:\n"
                                       "    - path: out/pruned\n      hash: md5\n      md5: 0123abcd.dir\n")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "1b2c3d4e-flow-run")
    secret = "AKIAABCDEFGHIJKLMNOP"
    params = {"aws_access_key_id": secret, "store": {"password": "hunter2"},
              "model": {"name": "https://user:hunter2@hub.example/model"},
              "data": {"source": "https://bucket.s3/x?X-Amz-Signature=sig123&X-Amz-Credential=cred456"}}
    manifest = register_version(store_uri, "tiny", model_dir, GOOD, params, {"note": f"key {secret}"})
    assert manifest["dvc_outs"] == {"out/pruned": "0123abcd.dir"}
    assert manifest["prefect_flow_run_id"] == "1b2c3d4e-flow-run"
    assert manifest["params"]["store"]["password"] == "***"
    promote(store_uri, "tiny", 1, "dev", reason="secret check")
    store = open_store(store_uri)
    everything = b"".join(store.get_bytes(key)[0] for key in store.list_keys("") if "/sha256/" not in key
                          or store.head(key).size < 100_000)
    for leaked in (secret.encode(), b"hunter2", b"sig123", b"cred456", b"perp-secret-8c1f"):
        assert leaked not in everything


# --------------------------------------------------------------------------------------------- tampering


def test_tampered_events_are_named_by_verify_and_block_writes(store_uri, model_dir):
    register_version(store_uri, "tiny", model_dir, GOOD)
    promote(store_uri, "tiny", 1, "dev", reason="first")
    promote(store_uri, "tiny", 1, "staging", reason="second")
    store = open_store(store_uri)
    key = event_key("tiny", 2)
    original = store.get_bytes(key)[0]
    event = json.loads(original)

    # 1. An edit that keeps the old hash: the event's own hash check names it.
    overwrite(store_uri, key, json.dumps({**event, "reason": "someone else"}).encode())
    problems = verify(store_uri)["problems"]
    assert [(p["kind"], p["seq"], p["key"]) for p in problems] == [("event_altered", 2, key)]
    assert f"event 2 of 'tiny' ({key}) was altered" in problems[0]["message"]
    with pytest.raises(RegistryIntegrityError, match=f"event 2 of 'tiny' \\({key}\\) was altered"):
        promote(store_uri, "tiny", 1, "prod", reason="x")

    # 2. An edit with a recomputed hash: the next event's link names it.
    forged = {**event, "reason": "someone else"}
    forged["hash"] = event_hash(forged)
    overwrite(store_uri, key, json.dumps(forged).encode())
    problems = verify(store_uri)["problems"]
    assert [(p["kind"], p.get("seq")) for p in problems][0] == ("chain_broken", 2), problems
    assert "event 2 of 'tiny'" in problems[0]["message"] and "prev_hash recorded by event 3" in problems[0]["message"]
    assert {p["kind"] for p in problems[1:]} <= {"pointer_altered"}  # the dev pointer recorded the true hash

    # 3. A deleted event.
    overwrite(store_uri, key, original)
    assert verify(store_uri)["ok"]
    delete(store_uri, key)
    assert [(p["kind"], p["seq"]) for p in verify(store_uri)["problems"]][0] == ("event_missing", 2)
    with pytest.raises(RegistryIntegrityError, match="event 2 of 'tiny'.*missing"):
        pull(store_uri, "tiny@1", "/nonexistent-never-created")
    overwrite(store_uri, key, original)
    assert verify(store_uri)["ok"]

    # 4. Dropping the newest events leaves a consistent chain: an anchor kept elsewhere catches it.
    head = register_version(store_uri, "tiny", model_dir, GOOD)["event"]["hash"]
    assert verify(store_uri, anchors=[head])["ok"]
    delete(store_uri, event_key("tiny", 4))
    assert verify(store_uri)["ok"]
    problems = verify(store_uri, anchors=[head])["problems"]
    assert [p["kind"] for p in problems] == ["anchor_missing"] and head in problems[0]["message"]


def test_a_stale_stage_pointer_is_reported_then_repaired_by_the_next_write(tmp_path, model_dir):
    uri = str(tmp_path / "store")
    register_version(uri, "tiny", model_dir, GOOD)
    promote(uri, "tiny", 1, "dev", reason="r")
    (Path(uri) / pointer_key("tiny", "dev")).unlink()  # as if the writer died between event and pointer
    assert [p["kind"] for p in verify(uri)["problems"]] == ["pointer_missing"]
    assert pull(uri, "tiny@dev", tmp_path / "out")["version"] == 1  # reads go by the log
    register_version(uri, "tiny", model_dir, GOOD)
    assert verify(uri)["ok"]


def test_corrupted_objects_fail_pull_and_verify_names_them(store_uri, model_dir, tmp_path):
    manifest = register_version(store_uri, "tiny", model_dir, GOOD)
    promote(store_uri, "tiny", 1, "dev", reason="r")
    weights = blob_key(manifest["storage"]["model.safetensors"]["blob"])
    original = open_store(store_uri).get_bytes(weights)[0]
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF
    overwrite(store_uri, weights, bytes(corrupted))
    with pytest.raises(RegistryIntegrityError, match="file 'model.safetensors' of 'tiny' v1.*corrupt"):
        pull(store_uri, "tiny@dev", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    problems = verify(store_uri)["problems"]
    assert [(p["kind"], p["file"], p["key"]) for p in problems] == [("blob_altered", "model.safetensors", weights)]
    assert verify(store_uri, deep=False)["ok"]  # same size: only the deep check sees it
    overwrite(store_uri, weights, original)

    manifest_key = blob_key(manifest["manifest_sha256"])
    overwrite(store_uri, manifest_key, open_store(store_uri).get_bytes(manifest_key)[0].replace(b'"tiny"', b'"tinx"'))
    problems = verify(store_uri)["problems"]
    assert [(p["kind"], p["key"]) for p in problems] == [("manifest_altered", manifest_key)]
    with pytest.raises(RegistryIntegrityError, match="manifest of 'tiny' v1 .* was altered"):
        pull(store_uri, "tiny@1", tmp_path / "out")


def test_tampered_stage_pointer_is_reported_and_ignored(store_uri, model_dir, tmp_path):
    register_version(store_uri, "tiny", model_dir, GOOD)
    register_version(store_uri, "tiny", model_dir, BAD)
    promote(store_uri, "tiny", 1, "dev", reason="r")
    key = pointer_key("tiny", "dev")
    pointer = json.loads(open_store(store_uri).get_bytes(key)[0])
    overwrite(store_uri, key, json.dumps({**pointer, "version": 2}).encode())
    overwrite(store_uri, pointer_key("tiny", "prod"), json.dumps({**pointer, "stage": "prod"}).encode())
    problems = verify(store_uri)["problems"]
    assert sorted((p["kind"], p["key"]) for p in problems) == [
        ("pointer_altered", key), ("pointer_altered", pointer_key("tiny", "prod"))]
    assert pull(store_uri, "tiny@dev", tmp_path / "o")["version"] == 1  # the log decides, not the pointer


# --------------------------------------------------------------------------------------------- killed uploads


def _process_context():
    """fork where the platform has it (children start in milliseconds), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _register_then_die(mode, uri, model, endpoint):
    """Register in a child process that SIGKILLs itself at a chosen point of the upload."""
    import shutil
    import signal

    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["PERP_S3_MULTIPART_MB"] = "5"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "mid-file" and uri.startswith("s3://"):
        import perp.io.s3

        make = perp.io.s3.s3_client

        def client(*args, **kwargs):  # dies while the second part of a multipart upload is in flight
            created = make(*args, **kwargs)
            parts = []

            def on_part(**_):
                parts.append(1)
                if len(parts) == 2:
                    die()

            created.meta.events.register("before-call.s3.UploadPart", on_part)
            return created

        perp.io.s3.s3_client = client
    elif mode == "mid-file":
        copy = shutil.copyfileobj

        def partial(src, dst, length=0):  # dies with half a large file written
            if os.fstat(src.fileno()).st_size > 1_000_000:
                dst.write(src.read(500_000))
                dst.flush()
                die()
            return copy(src, dst, length)

        shutil.copyfileobj = partial
    else:
        from perp.store.base import Store

        put = Store.put_blob_bytes

        def then_die(self, data):  # dies with every blob and the manifest stored, before the event
            put(self, data)
            die()

        Store.put_blob_bytes = then_die
    register_version(uri, "tiny", Path(model), {"gates": {}})


def _pull_then_die(uri, out):
    """Pull in a child process that SIGKILLs itself once the first packed download is in its scratch."""
    import signal

    import perp.registry.api as api

    real = api._finish_file

    def finish(where, rel, record, entry, dest, packed):
        if packed is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(where, rel, record, entry, dest, packed)

    api._finish_file = finish
    pull(uri, "tiny@1", out)


def test_a_pull_killed_halfway_leaves_nothing_the_next_pull_does_not_remove(model_dir, tmp_path, full_disk):
    from perp.io.atomic import SPACE_MARGIN_BYTES

    store_uri = str(tmp_path / "store")
    manifest = register_version(store_uri, "tiny", model_dir, GOOD)
    target = tmp_path / "pulls" / "tiny"
    child = _process_context().Process(target=_pull_then_die, args=(store_uri, str(target)))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -9  # SIGKILL: no cleanup ran
    (left,) = (tmp_path / "pulls").iterdir()  # only the staging directory, packed download inside it
    assert left.name.startswith(".tiny.partial-") and any(left.glob(".perp-pull-scratch-*/*.perp-sparse.safetensors"))

    # A disk with room for the pull only once the killed pull's leftovers are gone: the retry reclaims them first.
    packed = sorted(entry["size"] for entry in manifest["storage"].values() if entry["encoding"] != "raw")
    needed = int((manifest["bytes"] + sum(packed[-2:])) * 1.02) + SPACE_MARGIN_BYTES
    leftover = sum(path.stat().st_size for path in left.rglob("*") if path.is_file())
    full_disk(tmp_path / "pulls", free=needed - leftover // 2)
    pull(store_uri, "tiny@1", target)
    assert [path.name for path in (tmp_path / "pulls").iterdir()] == ["tiny"]
    assert tree_sha(target) == tree_sha(model_dir)


@pytest.mark.parametrize("mode", ["mid-file", "after-manifest"])
def test_upload_killed_halfway_leaves_no_visible_version(store_uri, model_dir, tmp_path, mode):
    model = tmp_path / "model"
    model.mkdir()
    for item in model_dir.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    (model / "extra.bin").write_bytes(os.urandom(11 * 1024 * 1024))  # multipart on S3 (5 MiB parts)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if store_uri.startswith("s3://") else None
    child = _process_context().Process(target=_register_then_die, args=(mode, store_uri, str(model), endpoint))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -9  # SIGKILL: no cleanup ran

    store = open_store(store_uri)
    if store_uri.startswith("s3://") and mode == "mid-file":
        uploads = boto3.client("s3", endpoint_url=store.endpoint_url).list_multipart_uploads(
            Bucket=BUCKET, Prefix=store.prefix)
        assert uploads.get("Uploads"), "the kill should have interrupted a multipart upload"
    assert store.list_keys("blobs"), "the child should have stored some blobs before dying"
    assert store.list_keys("models") == []  # no event, no pointer: nothing visible
    assert list_models(store_uri) == []
    with pytest.raises(RegistryError, match="not found"):
        pull(store_uri, "tiny@1", tmp_path / "out")
    assert verify(store_uri)["ok"]

    # What the killed upload left (a hidden temporary file, an unfinished multipart upload) is gc's to remove.
    looked = gc(store_uri, older_than_seconds=0)
    assert looked["stale_uploads"] == (1 if mode == "mid-file" else 0)
    assert looked["stale_uploads_removed"] == looked["stale_uploads"]
    if mode == "mid-file" and not store_uri.startswith("s3://"):
        assert looked["stale_upload_bytes"] == 500_000 and looked["stale_upload_names"][0].startswith("blobs/")
    if not store_uri.startswith("s3://"):  # moto dates every multipart upload 2010-11-10; S3 gives the real time
        assert gc(store_uri, older_than_seconds=3600)["stale_uploads_removed"] == 0  # young: may still be running
    gc(store_uri, older_than_seconds=0, dry_run=False)
    if store_uri.startswith("s3://"):
        with pytest.raises(RegistryError, match="does not exist"):  # nothing is left under the prefix
            gc(store_uri, older_than_seconds=0)
    else:
        assert gc(store_uri, older_than_seconds=0)["stale_uploads"] == 0
    if store_uri.startswith("s3://"):
        uploads = boto3.client("s3", endpoint_url=store.endpoint_url).list_multipart_uploads(
            Bucket=BUCKET, Prefix=store.prefix)
        assert not uploads.get("Uploads")
    else:
        assert not [p for p in Path(store_uri).rglob(".tmp-*")]

    assert register_version(store_uri, "tiny", model, measured_on(model, FIGURES))["version"] == 1  # no gap
    assert tree_sha(Path(pull(store_uri, "tiny@1", tmp_path / "out")["out"])) == tree_sha(model)


# --------------------------------------------------------------------------------------------- races


def _race_worker(uri, endpoint, worker, rounds, barrier, results):
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    from perp.registry import RegistryError, promote

    outcomes = []
    barrier.wait()
    for i in range(rounds):
        version = (worker + i) % 3 + 1
        try:
            event = promote(uri, "tiny", version, "dev", reason=f"worker {worker} round {i}")["event"]
            outcomes.append(("ok", event["seq"], event["hash"], version))
        except RegistryError as error:  # the clean loser's answer: already there
            outcomes.append(("refused", str(error), None, version))
        except Exception as error:  # anything else fails the test
            outcomes.append(("crash", repr(error), None, version))
    results.put((worker, outcomes))


def test_racing_promotions_lose_no_event_and_keep_the_chain(store_uri, model_dir, monkeypatch):
    for _ in range(3):
        register_version(store_uri, "tiny", model_dir, GOOD)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if store_uri.startswith("s3://") else None
    workers, rounds = 4, 4
    context = _process_context()
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_race_worker, args=(store_uri, endpoint, w, rounds, barrier, results))
                 for w in range(workers)]
    for process in processes:
        process.start()
    outcomes = [item for _ in processes for item in results.get(timeout=180)[1]]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert not [o for o in outcomes if o[0] == "crash"], outcomes
    refused = [o for o in outcomes if o[0] == "refused"]
    assert all("already in 'dev'" in o[1] for o in refused), refused
    won = [o for o in outcomes if o[0] == "ok"]
    events = history(store_uri, "tiny")
    assert len(events) == 3 + len(won)  # every success is in the log, nothing else
    by_seq = {e["seq"]: e for e in events}
    for _, seq, digest, version in won:
        assert by_seq[seq]["hash"] == digest and by_seq[seq]["version"] == version
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["prev_hash"] == p["hash"] for p, e in zip(events, events[1:]))
    promotions = [e for e in events if e["type"] == "promote"]
    assert all(e["previous_version"] == p["version"] for p, e in zip(promotions, promotions[1:]))
    pointer = json.loads(open_store(store_uri).get_bytes(pointer_key("tiny", "dev"))[0])
    assert (pointer["version"], pointer["seq"]) == (promotions[-1]["version"], promotions[-1]["seq"])
    report = verify(store_uri)
    assert report["ok"], report["problems"]


# --------------------------------------------------------------------------------------------- gc


def _copy_with_extra(model_dir, target: Path, name: str = "extra.bin", size: int = 200_000) -> Path:
    """A copy of the checkpoint plus one file of its own, so that it has a blob no other version shares."""
    target.mkdir()
    for item in model_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    (target / name).write_bytes(os.urandom(size))
    return target


def register_then_fail(uri, model, monkeypatch):
    """A registration that stores every blob and its manifest, then fails before its event (the in-process twin of
    the killed child of `_register_then_die`). Returns the blob keys it left."""
    from perp.store.base import Store

    before = set(open_store(uri).list_keys("blobs")) if store_keys(uri) else set()
    put = Store.put_blob_bytes

    def then_fail(self, data, **kwargs):
        put(self, data, **kwargs)
        raise RuntimeError("killed before the event")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "put_blob_bytes", then_fail)
        with pytest.raises(RuntimeError, match="killed before the event"):
            register_version(uri, "tiny", model, measured_on(model, FIGURES))
    return set(open_store(uri).list_keys("blobs")) - before


def test_gc_deletes_what_a_failed_registration_left_and_keeps_every_version(store_uri, model_dir, tmp_path,
                                                                            monkeypatch):
    withdrawn = _copy_with_extra(model_dir, tmp_path / "withdrawn", "notes.bin")
    register_version(store_uri, "tiny", withdrawn, measured_on(withdrawn, FIGURES))
    register_version(store_uri, "tiny", model_dir, GOOD)
    promote(store_uri, "tiny", 2, "dev", reason="ship")
    deregister(store_uri, "tiny", 1, reason="withdrawn, kept for the audit")
    store = open_store(store_uri)
    live = set(store.list_keys("blobs"))
    withdrawn_blob = blob_key(sha256_file(withdrawn / "notes.bin"))
    assert withdrawn_blob in live

    failed = _copy_with_extra(model_dir, tmp_path / "failed")
    orphans = register_then_fail(store_uri, failed, monkeypatch)
    assert blob_key(sha256_file(failed / "extra.bin")) in orphans and len(orphans) == 2  # its file + its manifest
    assert verify(store_uri)["ok"]  # orphans are invisible to the registry
    orphan_bytes = sum(store.head(key).size for key in orphans)

    young = gc(store_uri)  # the default grace period: a registration might still be running
    assert (young["dry_run"], young["orphaned"], young["kept_young"], young["deleted"]) == (True, 2, 2, 0)
    dry = gc(store_uri, older_than_seconds=0)
    assert dry["dry_run"] and dry["deleted_keys"] == sorted(orphans) and dry["bytes_reclaimed"] == orphan_bytes
    assert (dry["scanned"], dry["referenced"], dry["orphaned"]) == (len(live) + 2, len(live), 2)
    assert (dry["models"], dry["manifests"]) == (1, 2)
    assert set(store.list_keys("blobs")) == live | orphans  # a dry run deletes nothing

    done = gc(store_uri, older_than_seconds=0, dry_run=False)
    assert not done["dry_run"] and done["deleted_keys"] == sorted(orphans) and done["deleted"] == 2
    assert done["bytes_reclaimed"] == orphan_bytes
    assert set(store.list_keys("blobs")) == live  # the live and the deregistered version's blobs stay
    report = verify(store_uri)
    assert report["ok"], report["problems"]
    assert report["checked"]["manifests"] == 2 and show(store_uri, "tiny", 1)["deregistered"]
    assert tree_sha(Path(pull(store_uri, "tiny@dev", tmp_path / "out")["out"])) == tree_sha(model_dir)
    assert gc(store_uri, older_than_seconds=0, dry_run=False)["orphaned"] == 0


def test_gc_refuses_on_an_unreadable_event_or_manifest(store_uri, model_dir):
    manifest = register_version(store_uri, "tiny", model_dir, GOOD)
    promote(store_uri, "tiny", 1, "dev", reason="r")
    store = open_store(store_uri)
    orphan = blob_key(store.put_blob_bytes(b"left by a failed registration").sha256)
    manifest_key = blob_key(manifest["manifest_sha256"])
    first, newest = event_key("tiny", 1), event_key("tiny", 2)
    originals = {key: store.get_bytes(key)[0] for key in (manifest_key, first, newest)}
    damages = [
        (lambda: overwrite(store_uri, manifest_key, originals[manifest_key].replace(b'"tiny"', b'"tinx"')),
         r"the manifest of 'tiny' v1 \(event 1\) .* was altered"),
        (lambda: overwrite(store_uri, manifest_key, b"{not json"), "manifest of 'tiny' v1 .* was altered"),
        (lambda: delete(store_uri, manifest_key), "manifest of 'tiny' v1 .* is missing"),
        (lambda: overwrite(store_uri, first, b"{not json"), "event 1 of 'tiny' .* is not valid JSON"),
        (lambda: delete(store_uri, first), "event 1 of 'tiny' .* is missing"),
        # The newest event gone leaves a consistent chain; the stage pointer still records it.
        (lambda: delete(store_uri, newest), "records event 2 of 'tiny' but its log ends at event 1"),
    ]
    for damage, message in damages:
        damage()
        damaged = store.list_keys("")
        for dry_run in (True, False):
            with pytest.raises(RegistryError, match=f"^gc refused, nothing deleted: .*{message}"):
                gc(store_uri, older_than_seconds=0, dry_run=dry_run)
        assert store.list_keys("") == damaged and orphan in damaged
        for key, data in originals.items():
            overwrite(store_uri, key, data)
    assert verify(store_uri)["ok"]
    assert gc(store_uri, older_than_seconds=0, dry_run=False)["deleted_keys"] == [orphan]


def test_gc_keeps_old_orphans_that_a_running_registration_reuses(store_uri, model_dir, tmp_path, monkeypatch):
    """gc runs between a registration's uploads and its event, while that registration re-uses (deduplicates)
    blobs a failed attempt left long ago: they are refreshed on re-use, so the grace period keeps them."""
    import time

    import perp.registry.api as api
    register_version(store_uri, "tiny", model_dir, GOOD)
    retry = _copy_with_extra(model_dir, tmp_path / "retry")
    orphans = register_then_fail(store_uri, retry, monkeypatch)
    reused = blob_key(sha256_file(retry / "extra.bin"))
    (stale_manifest,) = orphans - {reused}
    time.sleep(3.5)  # the orphans are now older than the 2 s grace period below (S3 times are whole seconds)
    assert gc(store_uri, older_than_seconds=2)["deleted_keys"] == sorted(orphans)

    reports = []
    append = api.append_event

    def gc_then_append(store, name, build):
        reports.append(gc(store_uri, older_than_seconds=2, dry_run=False))
        return append(store, name, build)

    monkeypatch.setattr(api, "append_event", gc_then_append)
    assert register_version(store_uri, "tiny", retry, measured_on(retry, FIGURES))["version"] == 2
    (report,) = reports
    assert report["deleted_keys"] == [stale_manifest]  # the failed attempt's manifest: nobody re-used it
    assert report["kept_young"] == 2  # the re-used blob and the new manifest
    assert verify(store_uri)["ok"]
    assert tree_sha(Path(pull(store_uri, "tiny@2", tmp_path / "out")["out"])) == tree_sha(retry)


def test_gc_checks_each_blob_again_before_deleting_it(store_uri, monkeypatch):
    """A blob re-used after gc listed the store is kept, even though the listing said it was old."""
    from perp.store.base import BlobInfo

    store = open_store(store_uri)
    orphan = blob_key(store.put_blob_bytes(b"re-used while gc runs").sha256)
    listing = type(store).list_blobs

    def stale(self):  # the listing as it was a day ago
        return (BlobInfo(blob.sha256, blob.size, blob.last_modified - 2 * 86400) for blob in listing(self))

    monkeypatch.setattr(type(store), "list_blobs", stale)
    assert gc(store_uri)["deleted_keys"] == [orphan]  # a dry run trusts the listing
    report = gc(store_uri, dry_run=False)
    assert (report["deleted"], report["kept_young"]) == (0, 1) and store.head(orphan) is not None


def test_gate_details_show_counts_in_full():
    from perp.registry.gates import _check

    check = _check("prod", "model.decoder_linear_zeros", ">=", 36864, 50820, "zeroed decoder weights")
    assert check["passed"] and check["detail"] == "zeroed decoder weights 50820 >= 36864"
    check = _check("prod", "ppl_ratio", "<=", 1.25, 1.2345678, "perplexity ratio vs dense")
    assert check["detail"] == "perplexity ratio vs dense 1.235 <= 1.25"


def test_registration_sweeps_scratch_that_killed_registrations_left(tmp_path, model_dir):
    import shutil
    import time

    from perp.io.cache import STALE_SCRATCH_SECONDS, cache_dir

    scratch = cache_dir("tmp")
    stale, running = scratch / "register-killed1", scratch / "register-running"
    for directory in (stale, running):
        directory.mkdir(exist_ok=True)
        (directory / "0.perp-sparse.safetensors").write_bytes(b"x" * 1000)
    old = time.time() - STALE_SCRATCH_SECONDS - 60
    for path in (stale, stale / "0.perp-sparse.safetensors"):
        os.utime(path, (old, old))
    register_version(str(tmp_path / "store"), "tiny", model_dir, GOOD)
    assert not stale.exists() and running.exists()
    shutil.rmtree(running)


def test_a_mistyped_s3_prefix_is_refused_not_read_as_an_empty_registry(s3_endpoint, monkeypatch, model_dir):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    real = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    register_version(real, "tiny", model_dir, GOOD)
    typo = real + "-typo"
    for read in (verify, list_models, gc):
        with pytest.raises(RegistryError, match="does not exist"):
            read(typo)
    assert verify(real)["ok"] and [m["name"] for m in list_models(real)] == ["tiny"]


@pytest.mark.parametrize("size_path", ["read back", "cheap check"])
def test_registering_the_good_files_repairs_an_altered_blob(store_uri, model_dir, tmp_path, monkeypatch, size_path):
    """A held blob reused by size alone let a corrupted object into every later version; now it is re-uploaded."""
    import perp.store.base

    if size_path == "cheap check":  # large blobs: the hash cache (local), the recorded sha256 metadata (S3)
        monkeypatch.setattr(perp.store.base, "INTACT_READ_LIMIT", 0)
    first = register_version(store_uri, "tiny", model_dir, GOOD, compact=False)
    rel = "config.json"
    key = blob_key(first["storage"][rel]["blob"])
    data, _ = open_store(store_uri).get_bytes(key)
    altered = data.replace(b"{", b"[", 1)
    assert len(altered) == len(data) and altered != data
    overwrite(store_uri, key, altered)
    assert not verify(store_uri)["ok"]

    second = register_version(store_uri, "tiny", model_dir, GOOD, {"again": True}, compact=False)
    assert second["version"] == 2 and second["storage"][rel]["blob"] == first["storage"][rel]["blob"]
    assert verify(store_uri)["ok"]  # the blob both versions name is whole again
    assert tree_sha(Path(pull(store_uri, "tiny@1", tmp_path / "v1")["out"])) == tree_sha(model_dir)


def test_a_log_that_lost_its_newest_events_does_not_serve_its_stages(store_uri, model_dir, tmp_path):
    """Deleting the rollback would otherwise hand out the withdrawn version as prod."""
    for _ in range(2):
        register_version(store_uri, "tiny", model_dir, GOOD)
    to_prod(store_uri, 1)
    to_prod(store_uri, 2)
    rollback(store_uri, "tiny", "prod", reason="v2 is broken")
    head = history(store_uri, "tiny")[-1]["seq"]
    delete(store_uri, event_key("tiny", head))  # the rollback: the log alone would put v2 back in prod
    with pytest.raises(RegistryIntegrityError, match=rf"records event {head} of 'tiny' but its log ends at event "
                                                     rf"{head - 1}: events were deleted"):
        pull(store_uri, "tiny@prod", tmp_path / "out")
    with pytest.raises(RegistryIntegrityError, match="events were deleted"):
        show(store_uri, "tiny", "prod")
    assert "log_truncated" in {p["kind"] for p in verify(store_uri)["problems"]}
    assert pull(store_uri, "tiny@1", tmp_path / "v1")["version"] == 1  # a version by number is still served


def test_a_promotion_landing_between_reading_the_log_and_the_pointer_is_not_a_truncation(store_uri, model_dir,
                                                                                         tmp_path, monkeypatch):
    import perp.registry.api as api

    register_version(store_uri, "tiny", model_dir, GOOD)
    register_version(store_uri, "tiny", model_dir, BAD)
    to_prod(store_uri, 1)
    promote(store_uri, "tiny", 2, "dev", reason="next")
    real_read_pointer = api.read_pointer

    writes = iter([lambda: promote(store_uri, "tiny", 2, "staging", reason="concurrent writer"),
                   lambda: rollback(store_uri, "tiny", "staging", reason="concurrent writer")])

    def write_lands_first(store, name, stage):  # the log was read; a concurrent writer moves staging now
        monkeypatch.setattr(api, "read_pointer", real_read_pointer)
        next(writes)()
        return real_read_pointer(store, name, stage)

    monkeypatch.setattr(api, "read_pointer", write_lands_first)
    assert pull(store_uri, "tiny@staging", tmp_path / "out")["version"] == 1  # what the log said when read
    monkeypatch.setattr(api, "read_pointer", write_lands_first)
    assert show(store_uri, "tiny", "staging")["version"] == 2
    assert verify(store_uri)["ok"] and show(store_uri, "tiny", "staging")["version"] == 1


def test_reusing_held_blobs_of_a_local_store_reads_none_of_them(tmp_path, model_dir, monkeypatch):
    """The intact check of large blobs goes through the hash cache, which uploads and refreshes keep current."""
    import perp.io.hashing
    import perp.store.base

    monkeypatch.setattr(perp.store.base, "INTACT_READ_LIMIT", 0)
    store = tmp_path / "store"
    register_version(str(store), "tiny", model_dir, GOOD, compact=False)
    deregister(str(store), "tiny", 1, reason="only its blobs stay")  # re-used blobs of it are refreshed
    reads = []
    real = perp.io.hashing.sha256_file
    monkeypatch.setattr(perp.io.hashing, "sha256_file",
                        lambda path: reads.append(Path(path)) or real(path))
    register_version(str(store), "tiny", model_dir, BAD, compact=False)
    register_version(str(store), "tiny", model_dir, GOOD, {"third": True}, compact=False)
    assert not [path for path in reads if store in path.resolve().parents]
    assert verify(str(store))["ok"]


def test_gc_also_removes_what_killed_event_and_pointer_writes_left(tmp_path, model_dir):
    uri = str(tmp_path / "store")
    register_version(uri, "tiny", model_dir, GOOD)
    left = [Path(uri) / "models" / "tiny" / "events" / ".tmp-killed", Path(uri) / "models" / "tiny" / ".tmp-x"]
    for path in left:
        path.write_bytes(b"{}")
    assert sorted(gc(uri, older_than_seconds=0)["stale_upload_names"]) == sorted(
        p.relative_to(uri).as_posix() for p in left)
    gc(uri, older_than_seconds=0, dry_run=False)
    assert not any(p.exists() for p in left) and verify(uri)["ok"]


def test_reuse_finds_an_identical_version_registered_before_it_read_the_log(store_uri, model_dir, monkeypatch):
    """No gap between a caller's own lookup and the registration: register_version(reuse=True) looks itself."""
    import perp.registry.api as api

    first = register_version(store_uri, "tiny", model_dir, GOOD, reuse=True)
    uploads = []
    monkeypatch.setattr(api.Store, "put_blob", lambda *args, **kwargs: uploads.append(args) or None)
    again = register_version(store_uri, "tiny", model_dir, GOOD, reuse=True)
    assert again["reused"] is True and again["version"] == first["version"] == 1 and not uploads
    assert [e["type"] for e in history(store_uri, "tiny")] == ["register"]


def test_events_on_s3_record_the_authenticated_principal(store_uri, model_dir):
    """`who` user/host are what the process says; on S3 the credentials' ARN (STS) is what AWS authenticated."""
    manifest = register_version(store_uri, "tiny", model_dir, GOOD)
    promote(store_uri, "tiny", 1, "dev", reason="audit")
    authors = [event["who"] for event in history(store_uri, "tiny")] + [manifest["who"]]
    expected = "arn:aws:sts::123456789012:user/moto" if store_uri.startswith("s3://") else None
    assert all(author.get("principal") == expected and author["user"] for author in authors)
    assert verify(store_uri)["ok"]


def _two_shard_model(model_dir: Path, target: Path) -> Path:
    """`model_dir` with its weights split over two safetensors shards (a sharded checkpoint's layout)."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    for index, part in enumerate((names[:half], names[half:])):
        save_file({name: tensors[name] for name in part}, str(target / f"model-0000{index + 1}-of-00002.safetensors"))
    return target


def test_packing_and_uploading_and_downloading_and_unpacking_overlap_across_shards(tmp_path, model_dir, monkeypatch):
    import threading
    import time

    from perp.registry import api
    from perp.registry.api import ENCODING_SPARSE

    shards = _two_shard_model(model_dir, tmp_path / "sharded")
    events: list[tuple[str, str]] = []
    real_pack, real_put = api._packed_if_smaller, type(open_store(str(tmp_path / "store"))).put_blob

    def pack(path, packed, digest, size):
        events.append(("pack", path.name))
        return real_pack(path, packed, digest, size)

    def slow_put(self, path, sha256=None, **kwargs):
        events.append(("upload-start", threading.current_thread().name))
        time.sleep(0.5)
        events.append(("upload-end", Path(path).name))
        return real_put(self, path, sha256, **kwargs)

    monkeypatch.setattr(api, "_packed_if_smaller", pack)
    monkeypatch.setattr(type(open_store(str(tmp_path / "store"))), "put_blob", slow_put)
    manifest = register_version(str(tmp_path / "store"), "sharded", shards)
    kinds = [kind for kind, _ in events]
    # the second shard is packed while the first one uploads, on the upload thread
    assert kinds.index("pack", 1) < kinds.index("upload-end")
    assert all(name.startswith("perp-upload") for kind, name in events if kind == "upload-start")
    assert list(manifest["storage"]) == sorted(manifest["files"])  # the manifest lists files in order
    assert any(entry["encoding"] == ENCODING_SPARSE for entry in manifest["storage"].values())

    # pulling mirrors it: the next blob downloads (on its own thread) while the previous shard is unpacked
    from perp.store import sparse_format

    events.clear()
    real_get, real_unpack = type(open_store(str(tmp_path / "store"))).get_blob, sparse_format.unpack_file

    def get(self, sha256, dest, **kwargs):
        events.append(("download", threading.current_thread().name))
        return real_get(self, sha256, dest, **kwargs)

    def slow_unpack(src, dst, **kwargs):
        events.append(("unpack-start", Path(dst).name))
        time.sleep(0.5)
        events.append(("unpack-end", Path(dst).name))
        return real_unpack(src, dst, **kwargs)

    monkeypatch.setattr(type(open_store(str(tmp_path / "store"))), "get_blob", get)
    monkeypatch.setattr(sparse_format, "unpack_file", slow_unpack)
    pulled = pull(str(tmp_path / "store"), "sharded@latest", tmp_path / "pulled")
    assert pulled["files"] == len(manifest["files"])
    assert tree_sha(tmp_path / "pulled") == tree_sha(shards)
    kinds = [kind for kind, _ in events]
    assert kinds.index("download", 1) < kinds.index("unpack-end")
    assert all(name.startswith("perp-download") for kind, name in events if kind == "download")


def test_a_failed_background_upload_fails_the_registration_and_registers_nothing(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("PERP_CACHE", str(tmp_path / "cache"))  # its own scratch directory, to look into
    shards = _two_shard_model(model_dir, tmp_path / "sharded")
    store_class = type(open_store(str(tmp_path / "store")))
    real_put = store_class.put_blob

    def failing_put(self, path, sha256=None, **kwargs):
        if Path(path).name.startswith("0."):  # the first shard's packed file
            raise OSError(5, "Input/output error")
        return real_put(self, path, sha256, **kwargs)

    monkeypatch.setattr(store_class, "put_blob", failing_put)
    with pytest.raises(OSError, match="Input/output error"):
        register_version(str(tmp_path / "store"), "sharded", shards)
    monkeypatch.setattr(store_class, "put_blob", real_put)
    assert not (tmp_path / "store").exists() or list_models(str(tmp_path / "store")) == []
    from perp.io.cache import cache_dir

    assert not [p for p in cache_dir("tmp").glob("register-*") if any(p.iterdir())]  # no packed file left


def test_an_earlier_upload_failure_is_reported_before_a_later_packing_failure(tmp_path, model_dir, monkeypatch):
    from perp.registry import api

    shards = _two_shard_model(model_dir, tmp_path / "sharded")
    store_class = type(open_store(str(tmp_path / "store")))
    real_pack = api._packed_if_smaller

    def failing_put(self, path, sha256=None, **kwargs):
        raise StoreUnreachable("upload of the first shard failed")

    def pack(path, packed, digest, size):
        if path.name.startswith("model-00002"):
            raise OSError(28, "No space left on device")
        return real_pack(path, packed, digest, size)

    monkeypatch.setattr(store_class, "put_blob", failing_put)
    monkeypatch.setattr(api, "_packed_if_smaller", pack)
    with pytest.raises(StoreUnreachable, match="upload of the first shard failed"):
        register_version(str(tmp_path / "store"), "sharded", shards)


def test_ctrl_c_does_not_wait_for_the_transfer_in_flight(tmp_path, model_dir, monkeypatch):
    import time

    from perp.registry import api

    shards = _two_shard_model(model_dir, tmp_path / "sharded")
    store_class = type(open_store(str(tmp_path / "store")))
    real_pack = api._packed_if_smaller

    def slow_put(self, path, sha256=None, **kwargs):
        time.sleep(10)  # a multi-GB shard on its way
        raise StoreUnreachable("too late")

    def pack(path, packed, digest, size):
        if path.name.startswith("model-00002"):
            raise KeyboardInterrupt
        return real_pack(path, packed, digest, size)

    monkeypatch.setattr(store_class, "put_blob", slow_put)
    monkeypatch.setattr(api, "_packed_if_smaller", pack)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        register_version(str(tmp_path / "store"), "sharded", shards)
    assert time.perf_counter() - started < 5  # not held until the 10 s upload ends
