import json

import pytest
from safetensors.torch import load_file, save_file

from perp.config import load_params
from perp.data.calibrate import load_token_set, run_calibrate
from perp.errors import DataSourceError
from perp.io.atomic import is_complete


def test_calibrate_stage_stores_windows_with_their_hash(tmp_path):
    config = load_params(overrides=["model.name=tiny-llama", "data.calibration.nsamples=4",
                                    "data.calibration.seqlen=64"])
    out = tmp_path / "calibration"
    description = run_calibrate(config, out)
    assert is_complete(out)
    token_set = load_token_set(out)
    assert token_set.ids.shape == (4, 64)
    assert token_set.hash == description["sha256"]
    assert json.loads((out / "params.json").read_text())["calibration"]["nsamples"] == 4
    # The same seed gives the same windows; another seed does not.
    again = run_calibrate(config, tmp_path / "again")
    assert again["sha256"] == description["sha256"]
    other = load_params(overrides=["model.name=tiny-llama", "data.calibration.nsamples=4",
                                   "data.calibration.seqlen=64", "data.calibration.seed=1"])
    assert run_calibrate(other, tmp_path / "other")["sha256"] != description["sha256"]


def test_altered_calibration_set_is_refused(tmp_path):
    config = load_params(overrides=["model.name=tiny-llama", "data.calibration.nsamples=2",
                                    "data.calibration.seqlen=32"])
    out = tmp_path / "calibration"
    run_calibrate(config, out)
    ids = load_file(str(out / "calibration.safetensors"))["ids"]
    ids[0, 0] += 1
    save_file({"ids": ids}, str(out / "calibration.safetensors"))
    with pytest.raises(DataSourceError, match="does not match its recorded sha256"):
        load_token_set(out)
    with pytest.raises(DataSourceError, match="is not a calibration set"):
        load_token_set(tmp_path)


def test_failed_calibration_leaves_no_output(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    config = load_params(overrides=["model.name=tiny-llama", f"data.calibration.source={short}"])
    with pytest.raises(DataSourceError, match="shorter than one window"):
        run_calibrate(config, tmp_path / "calibration")
    assert not (tmp_path / "calibration").exists()
    assert not any(p.name.startswith(".calibration") for p in tmp_path.iterdir())


def test_staging_left_by_a_killed_process_is_removed(tmp_path):
    import subprocess
    import sys

    from perp.io.atomic import atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    stale = tmp_path / f".out.partial-{socket.gethostname()}-{dead.stdout.strip()}-deadbeef"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"x" * 10)
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "ok").write_text("1")
    assert not stale.exists()
    assert (tmp_path / "out" / "ok").is_file()


def test_staging_of_another_host_is_removed_once_untouched_for_a_day(tmp_path):
    """A pod evicted from a shared volume: its host will never come back to clean up, and its pid means nothing
    here. A day without a write says it is dead; a younger one may be a live writer elsewhere and is kept."""
    import os
    import time

    from perp.io.atomic import STALE_STAGING_SECONDS, atomic_directory

    old, young = tmp_path / ".out.partial-evicted-pod-7-deadbeef", tmp_path / ".out.partial-other-node-8-0badcafe"
    for staging in (old, young):
        (staging / "shard").mkdir(parents=True)
        (staging / "shard" / "weights.bin").write_bytes(b"x" * 10)
    then = time.time() - STALE_STAGING_SECONDS - 60
    for path in (old / "shard" / "weights.bin", old / "shard", old):
        os.utime(path, (then, then))
    os.utime(young, (then, then))  # an old directory with a fresh file inside: still being written
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "ok").write_text("1")
    assert not old.exists() and young.exists()
