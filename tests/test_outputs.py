"""What the stages may write and what they refuse: output directories, incomplete inputs, diverged training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

from perp.config import load_params
from perp.data.windows import TokenSet
from perp.errors import ConfigError, ModelSourceError, OutputError
from perp.io.atomic import atomic_directory, check_output_directory
from perp.prune import MASKS_FILE, run_prune
from perp.recover import RecoverError, run_recover


def _calib() -> TokenSet:
    ids = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    return TokenSet(ids, "test:random", {"seed": 0})


def _config(model: str | Path, *sets: str):
    return load_params(None, [f"model.name={model}", "model.device=cpu", "data.calibration.source=embedded:wiki-calib",
                              "data.calibration.nsamples=4", "data.calibration.seqlen=32", "recover.seqlen=32",
                              "recover.steps=2", "data.evaluation.source=embedded:wiki-eval",
                              "data.evaluation.seqlen=32", "data.evaluation.max_windows=1", *sets])


@pytest.fixture(scope="module")
def pruned_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "pruned"
    run_prune(_config(tiny_llama_dir), out, calib=_calib())
    return out


# --------------------------------------------------------------------------------------------- output directories


def test_someone_elses_directory_is_never_replaced(tiny_llama_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match="exists and is not empty"):
        run_prune(_config(tiny_llama_dir), precious, calib=_calib())
    with pytest.raises(OutputError, match="exists and is not empty"):
        with atomic_directory(precious):
            pytest.fail("the staging directory was handed out")
    assert [p.name for p in precious.iterdir()] == ["thesis.txt"]
    file_target = tmp_path / "a-file"
    file_target.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_directory(file_target)


def test_an_empty_directory_or_a_complete_perp_output_is_replaced(pruned_dir, tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_prune(_config(tiny_llama_dir), empty, calib=_calib())
    again = tmp_path / "again"
    shutil.copytree(pruned_dir, again)
    run_prune(_config(tiny_llama_dir), again, calib=_calib())  # a complete perp output: replaced
    assert (empty / MASKS_FILE).is_file() and (again / MASKS_FILE).is_file()


def test_the_current_directory_and_the_inputs_are_refused(pruned_dir, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="current directory"):
        check_output_directory(".")
    with pytest.raises(OutputError, match="current directory"):
        check_output_directory(tmp_path.parent)
    copy = tmp_path / "model"
    shutil.copytree(pruned_dir, copy)
    with pytest.raises(OutputError, match="would replace the input"):
        run_recover(_config(copy), str(copy), copy)
    with pytest.raises(OutputError, match="would replace the input"):
        shutil.copytree(pruned_dir, tmp_path / "sub" / "model")
        check_output_directory(tmp_path / "sub", inputs=[tmp_path / "sub" / "model"])  # contains the input
    with pytest.raises(OutputError, match="would replace the input"):
        run_recover(_config(copy), str(copy), tmp_path / "model" / "inside")  # inside the input
    assert (copy / "prune_report.json").is_file()


def test_output_files_follow_the_umask(pruned_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    for path in pruned_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_masks_file_is_byte_identical_for_the_same_masks(pruned_dir, tiny_llama_dir, tmp_path):
    other = tmp_path / "other"
    run_prune(_config(tiny_llama_dir), other, calib=_calib())
    digest = [hashlib.sha256((d / MASKS_FILE).read_bytes()).hexdigest() for d in (pruned_dir, other)]
    assert digest[0] == digest[1]


# --------------------------------------------------------------------------------------------- inputs


def test_a_checkpoint_with_missing_tensors_is_refused(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from perp.models import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"incomplete: 1 tensor\(s\) missing .*layers\.1\.mlp\.down_proj"):
        load_model(str(broken), device="cpu")


def test_masks_of_another_pruning_are_refused_before_training(pruned_dir, tiny_llama_dir, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(pruned_dir, mixed)
    other = tmp_path / "p7"
    run_prune(_config(tiny_llama_dir, "prune.sparsity=0.7"), other, calib=_calib())
    shutil.copy(other / MASKS_FILE, mixed / MASKS_FILE)  # 70% masks next to 50% weights
    with pytest.raises(RecoverError, match="does not match the weights"):
        run_recover(_config(mixed, "recover.method=masklora"), str(mixed), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recovered_model_carries_its_pruning_plan(pruned_dir, tmp_path):
    report = run_recover(_config(pruned_dir, "recover.method=norm"), str(pruned_dir), tmp_path / "r")
    source = json.loads((pruned_dir / "prune_report.json").read_text())
    assert report["pruning"]["planned_pruned_weights"] == source["planned_pruned_weights"]
    assert report["pruning"]["target_sparsity"] == source["target_sparsity"]
    again = run_recover(_config(tmp_path / "r", "recover.method=norm"), str(tmp_path / "r"), tmp_path / "rr")
    assert again["pruning"] == report["pruning"]  # passed on by a recovered input


def test_bad_settings_are_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="recover.weight_decay: must be a finite number >= 0"):
        _config(tiny_llama_dir, "recover.weight_decay=-1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_prune(_config(tiny_llama_dir, "prune.pattern=2:4", "prune.sparsity=0.6"), tmp_path / "nm",
                           calib=_calib())
    assert any("prune.sparsity 0.6 is ignored" in str(w.message) for w in caught)
    assert report["target_sparsity"] == 0.5 and any("ignored" in note for note in report["notes"])


# --------------------------------------------------------------------------------------------- divergence


def test_diverged_recovery_writes_nothing(pruned_dir, tmp_path, monkeypatch):
    import perp.recover.run as recover_run

    real = recover_run._ppl

    def after_training_overflows(model, windows, batch_size, progress, stage):
        result = real(model, windows, batch_size, progress, stage)
        return {**result, "ppl": float("inf")} if stage == "ppl_after" else result

    monkeypatch.setattr(recover_run, "_ppl", after_training_overflows)
    with pytest.raises(RecoverError, match="training diverged.*nothing was written"):
        run_recover(_config(pruned_dir, "recover.method=norm"), str(pruned_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recovery_that_makes_things_worse_is_kept_with_a_warning(pruned_dir, tmp_path, monkeypatch):
    import perp.recover.run as recover_run
    from perp.recover.report import RecoveryRegressionWarning

    real = recover_run._ppl

    def worse_after(model, windows, batch_size, progress, stage):
        result = real(model, windows, batch_size, progress, stage)
        return {**result, "ppl": result["ppl"] * 2} if stage == "ppl_after" else result

    monkeypatch.setattr(recover_run, "_ppl", worse_after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_recover(_config(pruned_dir, "recover.method=norm"), str(pruned_dir), tmp_path / "out")
    assert report["worse_than_before"] is True and (tmp_path / "out").is_dir()
    assert any(issubclass(w.category, RecoveryRegressionWarning) for w in caught)
    assert json.loads((tmp_path / "out" / "recover_report.json").read_text())["worse_than_before"] is True


def test_a_symlinked_output_is_written_where_it_points(tiny_llama_dir, tmp_path):
    elsewhere = tmp_path / "big-disk" / "pruned"
    elsewhere.mkdir(parents=True)
    link = tmp_path / "pruned"
    link.symlink_to(elsewhere, target_is_directory=True)
    run_prune(_config(tiny_llama_dir), link, calib=_calib())
    assert link.is_symlink() and (elsewhere / MASKS_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big-disk", "pruned"]


def test_a_complete_output_of_another_stage_is_not_replaced(pruned_dir, tmp_path):
    from perp.data.calibrate import run_calibrate
    from perp.io.atomic import output_kind

    copy = tmp_path / "pruned"
    shutil.copytree(pruned_dir, copy)
    assert output_kind(copy) == "prune"
    with pytest.raises(OutputError, match="holds a perp prune output; writing a calibration output"):
        run_calibrate(_config("tiny-llama"), copy)
    with pytest.raises(OutputError, match="holds a perp prune output; writing a recover output"):
        run_recover(_config(pruned_dir, "recover.method=norm"), str(pruned_dir), copy)
    assert (copy / MASKS_FILE).is_file()


def test_reports_record_local_models_by_absolute_path(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    report = run_prune(_config(tiny_llama_dir.name), tmp_path / "p", calib=_calib())
    assert report["base_model"]["source"] == str(tiny_llama_dir.resolve())
    recovered = run_recover(_config(tmp_path / "p", "recover.method=norm"), str(os.path.relpath(tmp_path / "p")),
                            tmp_path / "r")
    assert recovered["model"] == str((tmp_path / "p").resolve())


def test_report_and_metrics_outputs_never_destroy_inputs_or_user_files(pruned_dir, tmp_path, monkeypatch, cli):
    from perp.report import ReportError, render_report

    mine = tmp_path / "mine"
    (mine / "runs").mkdir(parents=True)
    (mine / "runs" / "data.txt").write_text("keep")
    (mine / "photo.png").write_text("keep")
    monkeypatch.chdir(mine)
    with pytest.raises(OutputError):
        render_report(pruned_dir, out_dir=Path("."))
    with pytest.raises(ReportError, match="would replace the run directory"):
        render_report(pruned_dir, out_dir=pruned_dir)
    assert (mine / "runs" / "data.txt").is_file() and (mine / "photo.png").is_file()
    first = render_report(pruned_dir, out_dir=tmp_path / "report")
    again = render_report(pruned_dir, out_dir=tmp_path / "report")  # its own earlier report is replaced
    assert first == again and again.is_file()

    copy = tmp_path / "model"
    shutil.copytree(pruned_dir, copy)
    result = cli("evaluate", "--model", str(copy), "--out", str(copy / "prune_report.json"), "-S", "model.device=cpu")
    assert result.returncode == 2 and "would overwrite or write into the input" in result.stderr, result.stderr
    assert json.loads((copy / "prune_report.json").read_text())["method"]


def test_outputs_in_a_group_shared_directory_keep_its_setgid_bit(tiny_llama_dir, tmp_path):
    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(shared.stat().st_mode | stat.S_ISGID)
    run_prune(_config(tiny_llama_dir), shared / "pruned", calib=_calib())
    assert (shared / "pruned").stat().st_mode & stat.S_ISGID
