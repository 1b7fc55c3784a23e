"""Zero-shot evaluation: lm-eval's stock tasks on local data, identical to running lm-eval directly; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from perp.evaluate.zeroshot import TaskDataError, evaluate_zeroshot, validate_zeroshot

LIMIT = 6
# arc_easy: the test split, a dataset_name to clear; hellaswag: process_docs; winogrande: Python prompt
# functions with one context per choice; boolq: a validation split and a version 2 task.
TASKS = ["arc_easy", "hellaswag", "winogrande", "boolq"]


@pytest.fixture(scope="module")
def tasks_dir(shared_data: Path) -> Path:
    return shared_data / "tasks"


@pytest.fixture(scope="module")
def head_dir(tasks_dir: Path, tmp_path_factory) -> Path:
    """The first 40 records of each real task file: the same first LIMIT examples, far less to convert."""
    directory = tmp_path_factory.mktemp("task-heads")
    for task in TASKS:
        _copy(tasks_dir, directory, task, task, lines=40)
    return directory


@pytest.fixture(scope="module")
def tiny():
    from perp.models.tiny import build_tiny_model, byte_tokenizer

    return build_tiny_model("llama"), byte_tokenizer()


def _direct_lm_eval(model, tokenizer, tasks_dir: Path, tmp: Path) -> dict:
    """lm-eval as a user would run it by hand: stock YAMLs included, every split they name read from the file."""
    import lm_eval.tasks
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    stock = Path(lm_eval.tasks.__file__).parent
    files = {"arc_easy": "arc/arc_easy.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
             "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml"}
    for task, relative in files.items():
        data = str(tasks_dir / f"{task}.jsonl")
        splits = {split: data for split in ("train", "validation", "test")}
        config = {"include": str(stock / relative), "task": task, "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": splits}}
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(config))
    manager = TaskManager(include_path=str(tmp), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    return simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, limit=LIMIT, log_samples=False)


def test_zeroshot_equals_lm_eval_run_directly(tiny, head_dir, tmp_path):
    model, tokenizer = tiny
    ours = evaluate_zeroshot(model, tokenizer, TASKS, str(head_dir), LIMIT, 8)
    direct = _direct_lm_eval(model, tokenizer, head_dir, tmp_path)

    import lm_eval

    assert ours["lm_eval_version"] == lm_eval.__version__
    assert ours["limit"] == LIMIT and ours["num_fewshot"] == 0
    assert list(ours["tasks"]) == TASKS
    for task in TASKS:
        mine, theirs = ours["tasks"][task], direct["results"][task]
        assert mine["samples"] == LIMIT == direct["n-samples"][task]["effective"]
        assert mine["total"] == direct["n-samples"][task]["original"]
        assert mine["version"] == direct["versions"][task]
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert mine[metric] == theirs.get(f"{metric},none"), (task, metric)
        assert mine["data_sha256"] and Path(mine["data_file"]).name == f"{task}.jsonl"
    # acc_norm where the task defines it, None where it does not
    assert ours["tasks"]["arc_easy"]["acc_norm"] is not None and ours["tasks"]["boolq"]["acc_norm"] is None
    assert ours["tasks"]["boolq"]["version"] == 2.0
    assert ours["tasks"]["arc_easy"]["split"] == "test" and ours["tasks"]["hellaswag"]["split"] == "validation"
    assert ours["mean_acc"] == pytest.approx(sum(ours["tasks"][t]["acc"] for t in TASKS) / len(TASKS))


def test_validation_builds_tasks_without_a_model(tasks_dir):
    plan = validate_zeroshot(["ai2_arc", "piqa"], tasks_dir, limit=3)  # a tag expands to its tasks
    assert plan.names == ["arc_challenge", "arc_easy", "piqa"]
    assert plan.tasks is not None and len(plan.tasks) == 3
    assert {p.split for p in plan.plans} == {"test", "validation"}
    assert all(p.records and p.data_sha256 for p in plan.plans)


def _copy(tasks_dir: Path, directory: Path, source: str, target: str, lines: int = 20) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(tasks_dir / f"{source}.jsonl") as handle:
        content = "".join(handle.readline() for _ in range(lines))
    path = directory / f"{target}.jsonl"
    path.write_text(content)
    return path


def test_unknown_task_is_named(tasks_dir):
    with pytest.raises(TaskDataError) as error:
        validate_zeroshot(["arc_easy", "arc_easyy"], tasks_dir)
    message = str(error.value)
    assert "unknown task 'arc_easyy'" in message and "did you mean arc_easy" in message
    assert str(tasks_dir / "arc_easyy.jsonl") in message


def test_missing_task_file_is_named(tasks_dir, tmp_path):
    _copy(tasks_dir, tmp_path, "rte", "rte")
    with pytest.raises(TaskDataError) as error:
        validate_zeroshot(["rte", "piqa"], tmp_path)
    message = str(error.value)
    assert "task 'piqa'" in message and str(tmp_path / "piqa.jsonl") in message and "does not exist" in message


@pytest.mark.parametrize("task, wrong_layout, fields", [
    ("arc_easy", "boolq", "answerKey, choices"),  # prompt fields checked on the raw records
    ("hellaswag", "piqa", "'ctx_a'"),  # read by lm-eval's process_docs
    ("winogrande", "rte", "'answer'"),  # read by lm-eval's Python prompt functions
])
def test_task_file_with_wrong_fields_is_named(tasks_dir, tmp_path, task, wrong_layout, fields):
    path = _copy(tasks_dir, tmp_path, wrong_layout, task)
    with pytest.raises(TaskDataError) as error:
        validate_zeroshot([task], tmp_path)
    message = str(error.value)
    assert f"task '{task}'" in message and str(path) in message and "lacks field" in message and fields in message


def test_malformed_and_inconsistent_files(tasks_dir, tmp_path):
    path = tmp_path / "boolq.jsonl"
    path.write_text('{"question": "q", "passage": "p", "idx": 0, "label": 1}\nnot json\n')
    with pytest.raises(TaskDataError, match=r"task 'boolq': .*boolq.jsonl line 2 is not valid JSON"):
        validate_zeroshot(["boolq"], tmp_path)
    path.write_text("")
    with pytest.raises(TaskDataError, match=r"task 'boolq': .*boolq.jsonl is empty"):
        validate_zeroshot(["boolq"], tmp_path)
    records = [json.loads(line) for line in (tasks_dir / "rte.jsonl").read_text().splitlines()[:3]]
    records[2]["label"] = 7  # two choices: True / False
    (tmp_path / "rte.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(TaskDataError, match=r"task 'rte': .*rte.jsonl record 3 has answer index 7 but 2 choices"):
        validate_zeroshot(["rte"], tmp_path)


def test_groups_are_refused_with_their_tasks(tmp_path):
    with pytest.raises(TaskDataError, match=r"task 'mmlu' is an lm-eval group.*mmlu_stem"):
        validate_zeroshot(["mmlu"], tmp_path)


def test_cli_bad_input_is_one_line(cli, tasks_dir, tmp_path):
    shutil.copy(tasks_dir / "rte.jsonl", tmp_path / "rte.jsonl")
    result = cli("eval", "zeroshot", "--model", "tiny-llama", "--tasks", "rte,openbookqa", "--task-data",
                 str(tmp_path), "--limit", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "task 'openbookqa'" in result.stderr and "openbookqa.jsonl does not exist" in result.stderr
