"""`perp registry ...` and `perp pull`: --json outputs, exit codes, bad-input messages (run in-process)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from perp.io.hashing import sha256_file
from perp.registry.events import event_key
from perp.store.testing import cached_pruned_tiny, free_port, moto_s3

GOOD = {"sparsity": 0.5, "target_sparsity": 0.5,
        "gates": {"ppl_ratio": 1.1, "zeroshot_drop_points": 0.5, "sparsity": 0.5}}
BAD = {**GOOD, "gates": {"ppl_ratio": 1.4, "zeroshot_drop_points": 0.5, "sparsity": 0.5}}


@pytest.fixture
def cli(perp_in_process):
    """`perp ARGS...` in-process from an empty directory (no params.yaml, no out/): (exit code, stdout, stderr)."""
    return perp_in_process


def bound(metrics: dict) -> dict:
    """Metrics as perp evaluate writes them: naming the checkpoint they were measured on."""
    from perp.models.loading import model_content_hash

    return {**metrics, "model": {"sha256": model_content_hash(cached_pruned_tiny())}}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(bound(GOOD)))
    (tmp_path / "bad.json").write_text(json.dumps(bound(BAD)))
    (tmp_path / "unbound.json").write_text(json.dumps(GOOD))  # hand-written gate figures, naming no model
    (tmp_path / "lineage.json").write_text(json.dumps({"base_model": {"source": "tiny-llama", "sha256": "0" * 64}}))
    return tmp_path


def tree(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_full_lifecycle_with_json(cli, files, tmp_path):
    model = str(cached_pruned_tiny())
    store = str(tmp_path / "store")
    code, out, err = cli("registry", "register", model, "--name", "tiny", "--metrics", "good.json",
                         "--lineage", "lineage.json", "--store", store, "--json")
    assert code == 0, err
    registered = json.loads(out)
    assert registered["version"] == 1 and registered["lineage"]["base_model"]["source"] == "tiny-llama"
    assert registered["params"]["register"]["store"] == store and registered["metrics"] == bound(GOOD)
    code, out, _ = cli("registry", "register", model, "-n", "tiny", "--metrics", "bad.json", "--store", store, "--json")
    assert json.loads(out)["version"] == 2

    for stage in ("dev", "staging", "prod"):
        code, out, err = cli("registry", "promote", "tiny", "1", "--to", stage, "--reason", "ok", "--store", store,
                             "--json")
        assert code == 0 and json.loads(out)["promoted"] and json.loads(out)["stage"] == stage, err
    for stage in ("dev", "staging"):
        assert cli("registry", "promote", "tiny", "2", "--to", stage, "--store", store)[0] == 0

    code, out, err = cli("registry", "promote", "tiny", "2", "--to", "prod", "--store", store, "--json")
    assert code == 2
    refusal = json.loads(out)
    assert refusal["ok"] is False and refusal["gates"]["failed"] == ["ppl_ratio"]
    assert "gate ppl_ratio failed: perplexity ratio vs dense 1.4 exceeds the maximum 1.25 by 0.15" in err

    code, _, err = cli("registry", "promote", "tiny", "2", "--to", "prod", "--force", "--store", store)
    assert code == 2 and "--force needs a reason" in err
    code, out, err = cli("registry", "promote", "tiny", "2", "--to", "prod", "--force", "--reason", "hotfix",
                         "--store", store, "--json")
    assert code == 0 and json.loads(out)["forced"] and json.loads(out)["failed_gates"] == ["ppl_ratio"]

    code, out, _ = cli("registry", "list", "--store", store, "--json")
    assert json.loads(out)["models"][0]["stages"] == {"dev": 2, "prod": 2, "staging": 2}
    code, out, _ = cli("registry", "show", "tiny", "--store", store, "--json")
    assert [v["version"] for v in json.loads(out)["versions"]] == [1, 2]
    code, out, _ = cli("registry", "show", "tiny", "prod", "--store", store, "--json")
    assert json.loads(out)["version"] == 2 and json.loads(out)["stages"] == ["dev", "prod", "staging"]
    code, out, _ = cli("registry", "history", "tiny", "--stage", "prod", "--store", store, "--json")
    prod_events = json.loads(out)["events"]
    assert [(e["version"], e["forced"]) for e in prod_events] == [(1, False), (2, True)]

    code, out, err = cli("registry", "rollback", "tiny", "--store", store, "--json")
    assert code == 2 and "rollback needs a reason" in err
    code, out, _ = cli("registry", "rollback", "tiny", "--stage", "prod", "--reason", "v2 regressed",
                       "--store", store, "--json")
    assert code == 0 and json.loads(out)["version"] == 1 and json.loads(out)["previous_version"] == 2

    code, out, _ = cli("pull", "tiny@prod", "--out", "deploy", "--store", store, "--json")
    assert code == 0 and json.loads(out)["version"] == 1
    assert tree(tmp_path / "deploy") == tree(Path(model))

    code, out, _ = cli("registry", "verify", "--store", store, "--json")
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["checked"]["events"] == 9

    # Human-readable forms print without error.
    for args in (("registry", "list"), ("registry", "show", "tiny"), ("registry", "show", "tiny", "1"),
                 ("registry", "history", "tiny"), ("registry", "verify")):
        code, out, err = cli(*args, "--store", store)
        assert code == 0, (args, err)
    assert "forced" in cli("registry", "history", "tiny", "--store", store)[1]

    # A tampered event: verify exits non-zero and names it.
    key = event_key("tiny", 4)
    path = Path(store) / key
    path.write_text(path.read_text().replace('"reason":"ok"', '"reason":"approved by CEO"'))
    code, out, err = cli("registry", "verify", "--store", store)
    assert code == 1 and f"event 4 of 'tiny' ({key}) was altered" in err
    code, out, _ = cli("registry", "verify", "--store", store, "--json")
    assert code == 1 and json.loads(out)["problems"][0]["key"] == key


def test_bad_input_messages_and_exit_codes(cli, files, tmp_path):
    store = str(tmp_path / "store")
    assert cli("registry", "register", str(cached_pruned_tiny()), "-n", "tiny", "--metrics", "good.json",
               "--store", store)[0] == 0
    cases = [
        (("registry", "promote", "tiny", "5", "--to", "dev"), "model 'tiny' has no version 5"),
        (("registry", "promote", "tiny", "1", "--to", "qa"), "unknown stage 'qa' (allowed: dev, staging, prod)"),
        (("registry", "promote", "tiny", "x1", "--to", "dev"), "'x1' is not a version number"),
        (("registry", "promote", "../tiny", "1", "--to", "dev"), "'../tiny' is not a valid model name"),
        (("registry", "rollback", "tiny", "--reason", "r"), "'prod' of 'tiny' holds no version"),
        (("registry", "show", "ghost"), "model 'ghost' not found"),
        (("registry", "register", "missing-dir", "-n", "tiny"), "model directory 'missing-dir' does not exist"),
        (("registry", "register", str(cached_pruned_tiny()), "-n", "tiny", "--metrics", "nope.json"),
         "metrics file 'nope.json' does not exist"),
        (("registry", "register", str(cached_pruned_tiny()), "-n", "tiny", "--metrics", "unbound.json"),
         "metrics have gate figures but do not name the model they were measured on"),
        (("pull", "tiny@9", "--out", "o"), "model 'tiny' has no version 9"),
    ]
    before = sorted(p for p in Path(store).rglob("*"))
    for args, message in cases:
        code, out, err = cli(*args, "--store", store)
        assert code == 2 and message in err, (args, err)
    assert sorted(p for p in Path(store).rglob("*")) == before
    code, _, err = cli("registry", "list", "--store", "gs://bucket/prefix")
    assert code == 2 and "unknown store scheme 'gs://'" in err
    assert not (tmp_path / "o").exists()


def test_a_missing_local_store_is_an_error_for_reading_commands(cli, files, tmp_path):
    typo = tmp_path / "typo" / "path"
    for args in (("registry", "list"), ("registry", "verify"), ("registry", "show", "tiny"),
                 ("registry", "history", "tiny"), ("pull", "tiny@prod", "--out", "o"),
                 ("registry", "promote", "tiny", "1", "--to", "dev"),
                 ("registry", "rollback", "tiny", "--reason", "r"),
                 ("registry", "deregister", "tiny", "1", "--reason", "r"), ("registry", "gc", "--delete")):
        code, out, err = cli(*args, "--store", str(typo))
        assert code == 2 and out == "", (args, out)
        assert err.startswith("error: ") and f"store '{typo}' does not exist" in err, (args, err)
    code, out, err = cli("registry", "list", "--store", str(typo), "--json")
    assert code == 2 and out == "" and f"store '{typo}' does not exist" in err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "o").exists()

    # no params.yaml, no --store: the default ./perp-store, named as it is resolved
    code, _, err = cli("registry", "list")
    assert code == 2 and f"store '{tmp_path / 'perp-store'}' does not exist" in err

    # registering (writing) creates the store; then reading it works
    code, _, err = cli("registry", "register", str(cached_pruned_tiny()), "-n", "tiny", "--metrics", "good.json",
                       "--store", str(typo))
    assert code == 0, err
    code, out, err = cli("registry", "list", "--store", str(typo), "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)["models"]] == ["tiny"], err


def test_store_defaults_to_params_yaml(cli, files, tmp_path):
    (tmp_path / "params.yaml").write_text("register:\n  store: ./team-store\n  name: from-params\n")
    code, out, err = cli("registry", "register", str(cached_pruned_tiny()), "--metrics", "good.json", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "from-params" and (tmp_path / "team-store" / "models" / "from-params").is_dir()
    code, out, _ = cli("registry", "list", "--json")
    assert [m["name"] for m in json.loads(out)["models"]] == ["from-params"]


def test_s3_store_through_the_cli(cli, files, tmp_path, monkeypatch):
    with moto_s3(("perp-cli",)) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        store = f"s3://perp-cli/{uuid.uuid4().hex[:8]}"
        model = str(cached_pruned_tiny())
        assert cli("registry", "register", model, "-n", "tiny", "--metrics", "good.json", "--store", store)[0] == 0
        assert cli("registry", "promote", "tiny", "1", "--to", "dev", "--store", store)[0] == 0
        code, out, err = cli("pull", "tiny@dev", "--out", "pulled", "--store", store, "--json")
        assert code == 0, err
        assert tree(tmp_path / "pulled") == tree(Path(model))
        assert cli("registry", "verify", "--store", store)[0] == 0

    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", unreachable)
    monkeypatch.setenv("PERP_S3_MAX_ATTEMPTS", "2")
    code, _, err = cli("registry", "promote", "tiny", "1", "--to", "dev", "--store", "s3://perp-cli/x")
    assert code == 2 and f"S3 endpoint {unreachable} unreachable after 2 attempts" in err


def test_gc_dry_run_then_delete(cli, files, tmp_path):
    from perp.store import blob_key, open_store

    store = str(tmp_path / "store")
    assert cli("registry", "register", str(cached_pruned_tiny()), "-n", "tiny", "--metrics", "good.json",
               "--store", store)[0] == 0
    orphan = blob_key(open_store(store).put_blob_bytes(b"left by a killed registration").sha256)

    code, out, err = cli("registry", "gc", "--store", store, "--json")  # default: 24h grace, dry run
    report = json.loads(out)
    assert code == 0 and report["dry_run"] and report["older_than_seconds"] == 86400, err
    assert (report["orphaned"], report["kept_young"], report["deleted_keys"]) == (1, 1, [])
    code, out, err = cli("registry", "gc", "--store", store, "--older-than", "0s")
    assert code == 0 and "would delete" in out and f"would delete {orphan}" in err, (out, err)
    assert "run again with --delete to delete 1 orphan blob(s)" in err
    assert (Path(store) / orphan).is_file()
    code, out, err = cli("registry", "gc", "--store", store, "--older-than", "7d", "--delete", "--json")
    assert code == 0 and json.loads(out)["older_than_seconds"] == 7 * 86400 and json.loads(out)["deleted"] == 0
    code, out, err = cli("registry", "gc", "--store", store, "--older-than", "0s", "--delete", "--json")
    report = json.loads(out)
    assert code == 0 and not report["dry_run"] and report["deleted_keys"] == [orphan], err
    assert report["bytes_reclaimed"] == len(b"left by a killed registration")
    assert not (Path(store) / orphan).exists()
    code, out, err = cli("registry", "gc", "--store", store, "--older-than", "90s", "--delete")
    assert code == 0 and "deleted" in out, err
    assert cli("registry", "verify", "--store", store)[0] == 0


@pytest.mark.parametrize("duration", ["5x", "24", "-1h", "h", "1.h", "1 day"])
def test_gc_bad_duration_is_one_line(cli, files, tmp_path, duration):
    store = tmp_path / "store"
    code, out, err = cli("registry", "gc", "--store", str(store), "--older-than", duration, "--delete")
    assert code == 2 and out == "", (out, err)
    assert err == (f"error: --older-than: '{duration}' is not a duration (a number and a unit s, m, h or d: "
                   "90s, 30m, 24h, 7d)"), err
