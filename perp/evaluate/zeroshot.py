"""Zero-shot accuracy with lm-evaluation-harness's own tasks, `HFLM` and `simple_evaluate`.

The task definitions are lm-eval's stock YAMLs, unchanged. With `task_data=DIR`, only the dataset location is
redirected: for each task a generated YAML `include:`s the stock file and points the split lm-eval evaluates
(`test_split` when the task has one, else `validation_split`, exactly as `Task.eval_docs` chooses) at
`DIR/<task>.jsonl` through the `json` builder. Prompts, `process_docs`, metrics and versions all come from the stock
file, so the numbers are comparable with published lm-eval results. Splits the task names besides the evaluated
one (train, few-shot) are cleared, since the evaluation is zero-shot and the directory holds one file per task.

Everything that can be checked without a model (task names, the files, their fields) is checked by
`validate_zeroshot`, which builds the lm-eval tasks on the local files and exercises their prompt functions; the
errors name the task and the file.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perp.errors import PerpError
from perp.io.hub import offline_when_unreachable

TASK_FILE_SUFFIX = ".jsonl"
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
_INDEX_FORMAT = 1
_CHECK_DOCS = 200  # documents whose prompts are rendered during validation (Jinja compiles per call: keep it short)


class TaskDataError(PerpError):
    """A zero-shot task is unknown, cannot be redirected, or its data file is missing or malformed."""


# --------------------------------------------------------------------------------------------- lm-eval access


MIN_LM_EVAL = "0.4.13"


def _require_lm_eval() -> Any:
    """lm-eval, with the task index (`TaskManager.task_index`, `TaskManager.load`) and YAML loader perp uses."""
    try:
        import lm_eval
    except ImportError:
        raise PerpError(f"zero-shot evaluation needs lm-evaluation-harness: pip install 'lm-eval>={MIN_LM_EVAL},<0.5'"
                        ) from None
    try:
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml  # noqa: F401
    except ImportError:
        TaskManager = None
    if TaskManager is None or not hasattr(TaskManager, "load"):
        raise PerpError(f"lm-eval {getattr(lm_eval, '__version__', '?')} is too old for perp's zero-shot "
                        f"evaluation: pip install 'lm-eval>={MIN_LM_EVAL},<0.5'")
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return str(getattr(_require_lm_eval(), "__version__", "unknown"))


@dataclass(frozen=True)
class StockEntry:
    name: str
    kind: str  # TASK, PY_TASK, GROUP or TAG (lm-eval's index kinds)
    yaml_path: Optional[str]
    members: tuple[str, ...] = ()  # tasks of a tag, or the task list of a group


_INDEX: Optional[dict[str, StockEntry]] = None


def _tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def stock_index() -> dict[str, StockEntry]:
    """Every stock lm-eval task, tag and group with its YAML, memoised in-process and in the perp cache.

    lm-eval's `TaskManager()` parses ~15k YAML files (about 9 s on 2 cores). The name → file map only depends on
    the installed lm-eval, so it is kept in the cache, keyed by lm-eval's version and install location.
    """
    global _INDEX
    if _INDEX is not None:
        return _INDEX
    _require_lm_eval()
    from perp.io.cache import cache_dir
    from perp.io.hashing import sha256_bytes

    root = _tasks_root()
    key = sha256_bytes(f"{_INDEX_FORMAT}|{lm_eval_version()}|{root.resolve()}".encode())[:16]
    index_file = cache_dir("lm_eval") / f"task-index-{key}.json"
    index: Optional[dict[str, StockEntry]] = None
    if index_file.is_file():
        try:
            raw = json.loads(index_file.read_text())
            index = {name: StockEntry(name, e["kind"], e["yaml"], tuple(e["members"])) for name, e in raw.items()}
        except (ValueError, KeyError, TypeError):
            index = None
    if index is None:
        index = _build_stock_index()
        from perp.io.atomic import write_json_atomic

        write_json_atomic(index_file, {n: {"kind": e.kind, "yaml": e.yaml_path, "members": list(e.members)}
                                       for n, e in index.items()})
    _INDEX = index
    return index


def _build_stock_index() -> dict[str, StockEntry]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    index: dict[str, StockEntry] = {}
    for name, entry in manager.task_index.items():
        kind = entry.kind.name
        members: tuple[str, ...] = ()
        if kind == "TAG":
            members = tuple(sorted(entry.tags))
        elif kind == "GROUP" and isinstance((entry.cfg or {}).get("task"), list):
            members = tuple(str(t if isinstance(t, str) else t.get("task", t.get("group", "?")))
                            for t in entry.cfg["task"])
        index[name] = StockEntry(name, kind, str(entry.yaml_path) if entry.yaml_path else None, members)
    return index


def _stock_config(entry: StockEntry) -> dict[str, Any]:
    """The stock YAML with its includes merged, functions left unresolved (as `dir/module.fn` strings)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(entry.yaml_path, resolve_func=False, recursive=True)


# --------------------------------------------------------------------------------------------- planning


@dataclass
class TaskPlan:
    """One task: its stock definition and, with task data, the local file that replaces its evaluation split."""

    name: str
    yaml_path: str
    split: Optional[str]
    dataset: str  # the stock Hugging Face dataset (path[:name]) this task reads
    version: Any
    data_file: Optional[Path] = None
    data_sha256: Optional[str] = None
    records: Optional[int] = None
    raw_fields: frozenset[str] = frozenset()  # fields the prompt reads from the raw record (no process_docs)
    file_fields: tuple[str, ...] = ()  # the fields the data file has

    def redirected_config(self, cleared: dict[str, Any]) -> dict[str, Any]:
        assert self.data_file is not None and self.split is not None
        config: dict[str, Any] = {
            "include": self.yaml_path,
            "task": self.name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {self.split: str(self.data_file)}},
        }
        config.update(cleared)
        return config


@dataclass
class ZeroShotPlan:
    """Validated tasks, ready to evaluate. `tasks` holds the built lm-eval Task objects (None: built at run time)."""

    plans: list[TaskPlan]
    task_data: Optional[Path]
    limit: Optional[int]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: Optional[list[Any]] = None

    @property
    def names(self) -> list[str]:
        return [plan.name for plan in self.plans]


def _expand(names: list[str], index: dict[str, StockEntry], task_data: Optional[Path]) -> list[str]:
    """Tags expand to their tasks; groups and unknown names are errors that name the task (and its file)."""
    expanded: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        entry = index.get(name)
        where = f" ({task_data / (name + TASK_FILE_SUFFIX)} is not read)" if task_data is not None else ""
        if entry is None:
            close = difflib.get_close_matches(name, [n for n, e in index.items() if e.kind in ("TASK", "PY_TASK")],
                                              n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
            raise TaskDataError(f"unknown task '{name}': lm-eval {lm_eval_version()} has no task of that name"
                                f"{where}{hint}")
        if entry.kind == "TAG":
            expanded.extend(entry.members)
        elif entry.kind == "GROUP":
            shown = ", ".join(entry.members[:8]) + (", ..." if len(entry.members) > 8 else "")
            raise TaskDataError(f"task '{name}' is an lm-eval group, not a task{where}; pass its tasks by name "
                                f"({shown})")
        else:
            expanded.append(name)
    unique = list(dict.fromkeys(expanded))  # first occurrence of each, in order
    if not unique:
        raise TaskDataError("no zero-shot tasks given (e.g. --tasks boolq,rte,hellaswag,winogrande,arc_easy,"
                            "arc_challenge,openbookqa)")
    return unique


def _plan_task(name: str, entry: StockEntry, task_data: Optional[Path]) -> tuple[TaskPlan, dict[str, Any]]:
    cfg = _stock_config(entry)
    dataset = str(cfg.get("dataset_path", "?")) + (f":{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
    version = (cfg.get("metadata") or {}).get("version") if isinstance(cfg.get("metadata"), dict) else None
    split = cfg.get("test_split") or cfg.get("validation_split")
    plan = TaskPlan(name=name, yaml_path=str(entry.yaml_path), split=split, dataset=dataset, version=version)
    if not cfg.get("process_docs"):  # the prompt reads the file's own fields
        plan.raw_fields = frozenset(f for key in _TEMPLATE_KEYS for f in _template_fields(cfg.get(key)))
    if task_data is None:
        return plan, {}
    data_file = task_data / f"{name}{TASK_FILE_SUFFIX}"
    if entry.kind == "PY_TASK" or "class" in cfg or cfg.get("custom_dataset"):
        raise TaskDataError(f"task '{name}' is defined in Python by lm-eval, so its data location cannot be "
                            f"redirected to {data_file}; run it without --task-data")
    if not split:
        raise TaskDataError(f"task '{name}' names no validation or test split in {entry.yaml_path}, so "
                            f"{data_file} has no split to replace")
    # Only the evaluated split is on disk: clear the others the stock YAML names (train/few-shot, unused at 0-shot).
    cleared: dict[str, Any] = {key: None for key in _SPLIT_KEYS if cfg.get(key) and cfg.get(key) != split}
    fewshot = cfg.get("fewshot_config")
    if isinstance(fewshot, dict) and fewshot.get("split") and fewshot["split"] != split:
        cleared["fewshot_config"] = None
    plan.data_file = data_file.resolve() if data_file.exists() else data_file
    return plan, cleared


def _check_file(plan: TaskPlan) -> None:
    """The file exists, is JSON lines of objects with one field layout. Records the count and sha256."""
    from perp.io.hashing import cached_sha256

    path = plan.data_file
    assert path is not None
    expected = f"the {plan.split} split of {plan.dataset} in its Hugging Face field layout, one JSON object a line"
    if not path.is_file():
        raise TaskDataError(f"task '{plan.name}': {path} does not exist; --task-data needs {path.name} holding "
                            f"{expected}")
    first_keys: Optional[set[str]] = None
    records = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                reason = getattr(error, "msg", error)
                raise TaskDataError(f"task '{plan.name}': {path} line {number} is not valid JSON ({reason}); "
                                    f"expected {expected}") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"task '{plan.name}': {path} line {number} is a {type(record).__name__}, not "
                                    f"an object; expected {expected}")
            keys = set(record)
            if first_keys is None:
                first_keys = keys
            elif keys != first_keys:
                missing = sorted(first_keys - keys) or sorted(keys - first_keys)
                raise TaskDataError(f"task '{plan.name}': {path} line {number} has different fields from line 1 "
                                    f"(differs in {', '.join(missing)}); every record needs the same fields")
            records += 1
    if records == 0 or first_keys is None:
        raise TaskDataError(f"task '{plan.name}': {path} is empty; expected {expected}")
    plan.file_fields = tuple(sorted(first_keys))
    missing = sorted(plan.raw_fields - first_keys)
    if missing:
        raise TaskDataError(f"task '{plan.name}': {path} lacks field(s) {', '.join(missing)} that lm-eval's "
                            f"'{plan.name}' prompt reads (the file has: {', '.join(plan.file_fields)}); expected "
                            f"{expected}")
    plan.records = records
    plan.data_sha256 = cached_sha256(path)


def _template_fields(value: Any) -> set[str]:
    """Document fields a doc_to_* template reads: a bare field name, or the free variables of a Jinja template."""
    if not isinstance(value, str) or "/" in value and not ("{{" in value or "{%" in value):
        return set()  # lists, callables, and unresolved `!function` paths
    if _IDENTIFIER.match(value):
        return {value}
    if "{{" in value or "{%" in value:
        from jinja2 import Environment, meta

        environment = Environment()
        try:
            return set(meta.find_undeclared_variables(environment.parse(value))) - set(environment.globals)
        except Exception:  # noqa: BLE001  (a template lm-eval cannot parse fails there, with its own message)
            return set()
    return set()


def _check_task_docs(plan: TaskPlan, task: Any, limit: Optional[int]) -> None:
    """Run the task's own prompt functions on the first documents that will be evaluated (at most _CHECK_DOCS)."""
    path = plan.data_file
    docs = task.eval_docs
    features = set(getattr(docs, "features", None) or (docs[0].keys() if len(docs) else ()))
    required: set[str] = set()
    for key in _TEMPLATE_KEYS:
        required |= _template_fields(getattr(task.config, key, None))
    missing = sorted(required - features)
    if missing:
        raise TaskDataError(f"task '{plan.name}': {path} lacks field(s) {', '.join(missing)} that lm-eval's "
                            f"'{plan.name}' prompt reads (the file has: {', '.join(sorted(features))}); expected "
                            f"the field layout of {plan.dataset}")
    count = min(len(docs), _CHECK_DOCS if limit is None else int(limit), _CHECK_DOCS)
    for index in range(count):
        doc = docs[index]
        try:
            text = task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        except Exception as error:  # noqa: BLE001  (KeyError, jinja UndefinedError, TypeError...)
            raise TaskDataError(f"task '{plan.name}': {path} record {index + 1} does not fit lm-eval's prompt "
                                f"({type(error).__name__}: {error}); expected the field layout of "
                                f"{plan.dataset}") from None
        if choices is not None and isinstance(choices, list):
            answer = text if getattr(task, "multiple_input", 0) else target
            if isinstance(answer, int) and not isinstance(answer, bool) and not 0 <= answer < len(choices):
                raise TaskDataError(f"task '{plan.name}': {path} record {index + 1} has answer index {answer} but "
                                    f"{len(choices)} choices; expected the labels of {plan.dataset}")


def _build_tasks(plans: list[TaskPlan], configs: dict[str, dict[str, Any]], directory: Path,
                 hub_unreachable: Optional[str] = None) -> list[Any]:
    """Write the redirected YAMLs into `directory` and build lm-eval Task objects from them, one by one."""
    import yaml
    from lm_eval.tasks import TaskManager

    for plan in plans:
        (directory / f"{plan.name}.yaml").write_text(yaml.safe_dump(configs[plan.name], sort_keys=False))
    manager = TaskManager(include_path=str(directory), include_defaults=False)
    built = []
    for plan in plans:
        try:
            loaded = manager.load([plan.name])
            built.append(loaded["tasks"][plan.name])
        except TaskDataError:
            raise
        except Exception as error:  # noqa: BLE001  (datasets, process_docs and prompt errors surface here)
            raise _build_error(plan, error, hub_unreachable) from None
    return built


def _build_error(plan: TaskPlan, error: Exception, hub_unreachable: Optional[str] = None) -> TaskDataError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if plan.data_file is None:
        hub = f"the Hugging Face Hub is {hub_unreachable} and it is not cached" if hub_unreachable else (
            f"{type(error).__name__}: {message}")
        return TaskDataError(f"task '{plan.name}': cannot load its Hugging Face dataset {plan.dataset} "
                             f"({hub}); offline, pass --task-data DIR holding "
                             f"{plan.name}{TASK_FILE_SUFFIX} (the {plan.split} split in its field layout)")
    if isinstance(error, KeyError):  # process_docs or a prompt function reading a field the file lacks
        return TaskDataError(f"task '{plan.name}': {plan.data_file} lacks field {error} that lm-eval's "
                             f"'{plan.name}' task reads (the file has: {', '.join(plan.file_fields)}); expected "
                             f"the {plan.split} split of {plan.dataset} in its Hugging Face field layout")
    return TaskDataError(f"task '{plan.name}': lm-eval cannot read {plan.data_file} ({type(error).__name__}: "
                         f"{message}); expected the {plan.split} split of {plan.dataset} in its Hugging Face "
                         "field layout")


def validate_zeroshot(tasks: list[str], task_data: Optional[str | Path], limit: Optional[int] = None) -> ZeroShotPlan:
    """Check tasks and task files before any model is loaded; returns the plan `evaluate_zeroshot` runs.

    Unknown tasks, groups, tasks lm-eval defines in Python (with task data), a missing `DIR/<task>.jsonl`, a file
    that is not JSON lines, and a file whose fields do not fit the task's prompt are each a `TaskDataError`
    naming the task and the file. The lm-eval tasks are built here (no model needed): their data is read (the
    local files, or the stock Hugging Face datasets without `task_data`), and `process_docs` and the prompt
    functions run on the first documents that will be evaluated.
    """
    if limit is not None and int(limit) <= 0:
        raise TaskDataError(f"evaluate.zeroshot.limit: must be > 0, got {limit}")
    directory = Path(task_data).expanduser() if task_data is not None else None
    if directory is not None and not directory.is_dir():
        raise TaskDataError(f"--task-data '{task_data}' is not a directory (expected DIR/<task>.jsonl files)")
    index = stock_index()
    names = _expand(list(tasks), index, directory)
    plans: list[TaskPlan] = []
    configs: dict[str, dict[str, Any]] = {}
    for name in names:
        plan, cleared = _plan_task(name, index[name], directory)
        plans.append(plan)
        if directory is not None:
            _check_file(plan)
            configs[name] = plan.redirected_config(cleared)
        else:  # the stock task as is (including the stock file is cheaper than indexing all of lm-eval's)
            configs[name] = {"include": plan.yaml_path, "task": name}
    result = ZeroShotPlan(plans=plans, task_data=directory.resolve() if directory else None, limit=limit,
                          configs=configs)
    hub = offline_when_unreachable() if directory is None else nullcontext(None)
    with tempfile.TemporaryDirectory(prefix="perp-tasks-") as tmp, _quiet_datasets(), hub as unreachable:
        built = _build_tasks(plans, configs, Path(tmp), unreachable)
        for plan, task in zip(plans, built):
            _check_task_docs(plan, task, limit)
    result.tasks = built
    return result


class _quiet_datasets:
    """Silence `datasets` progress bars for the duration (they would interleave with perp's own)."""

    def __enter__(self) -> _quiet_datasets:
        try:
            from datasets.utils import logging as ds_logging

            self._was = ds_logging.is_progress_bar_enabled()
            ds_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001  (an older datasets without these helpers: bars stay on)
            self._was = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._was:
            from datasets.utils import logging as ds_logging

            ds_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------- evaluation


def _number(value: Any) -> Optional[float]:
    """lm-eval writes 'N/A' for a stderr it cannot compute; NaN and non-numbers become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def summarize_results(results: dict[str, Any], plan: ZeroShotPlan) -> dict[str, dict[str, Any]]:
    """Per task: acc, acc_norm and their stderr (None where the task does not define them), every other metric,
    the version, shots and sample counts, and the data file with its hash."""
    summary: dict[str, dict[str, Any]] = {}
    by_name = {p.name: p for p in plan.plans}
    for name in plan.names:
        raw = results["results"].get(name, {})
        metrics: dict[str, Optional[float]] = {}
        for key, value in raw.items():
            if "," not in key:
                continue
            metric, _, filter_name = key.partition(",")
            label = metric if filter_name == "none" else f"{metric},{filter_name}"
            metrics[label] = _number(value)
        samples = results.get("n-samples", {}).get(name, {})
        task_plan = by_name[name]
        summary[name] = {
            "acc": metrics.get("acc"),
            "acc_stderr": metrics.get("acc_stderr"),
            "acc_norm": metrics.get("acc_norm"),
            "acc_norm_stderr": metrics.get("acc_norm_stderr"),
            "metrics": metrics,
            "version": results.get("versions", {}).get(name, task_plan.version),
            "num_fewshot": results.get("n-shot", {}).get(name),
            "samples": samples.get("effective"),
            "total": samples.get("original"),
            "split": task_plan.split,
            "dataset": task_plan.dataset,
            "data_file": str(task_plan.data_file) if task_plan.data_file else None,
            "data_sha256": task_plan.data_sha256,
        }
    return summary


def mean_acc(tasks: dict[str, dict[str, Any]]) -> Optional[float]:
    """The zero-shot mean, over acc (as in the PERP and Wanda papers); tasks without acc are left out."""
    values = [record["acc"] for record in tasks.values() if record.get("acc") is not None]
    return sum(values) / len(values) if values else None


def run_lm_eval(model: Any, tokenizer: Any, plan: ZeroShotPlan, batch_size: int,
                num_fewshot: int = 0) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` with its `HFLM` around the in-memory model; returns lm-eval's results dict."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with tempfile.TemporaryDirectory(prefix="perp-tasks-") as tmp:
            from lm_eval.tasks import TaskManager

            tasks: list[Any] = plan.tasks or _build_tasks(plan.plans, plan.configs, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)
            # lm-eval prints a few lines (bootstrapping...) with print(): keep stdout clean for --json.
            with contextlib.redirect_stdout(sys.stderr):
                results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=plan.limit,
                                          num_fewshot=num_fewshot, batch_size=batch_size, log_samples=False)
    finally:
        if was_training:
            model.train()
    if results is None:  # only non-zero ranks get None
        raise PerpError("lm-eval returned no results (not rank 0)")
    return results


def evaluate_zeroshot(model: Any, tokenizer: Any, tasks: list[str], task_data: Optional[str | Path],
                      limit: Optional[int], batch_size: int, *, plan: Optional[ZeroShotPlan] = None) -> dict[str, Any]:
    """Zero-shot accuracy on lm-eval's stock tasks, with their data from `task_data/<task>.jsonl` when given.

    Returns the lm-eval version, the limit, per task its version, acc, acc_norm and their stderr, and `mean_acc`,
    the mean of acc over the tasks. Pass the `plan` from `validate_zeroshot` to skip validating again.
    """
    if plan is None:
        plan = validate_zeroshot(tasks, task_data, limit)
    started = time.perf_counter()
    results = run_lm_eval(model, tokenizer, plan, batch_size)
    per_task = summarize_results(results, plan)
    return {
        "lm_eval_version": lm_eval_version(),
        "limit": plan.limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "task_data": str(plan.task_data) if plan.task_data else None,
        "tasks": per_task,
        "mean_acc": mean_acc(per_task),
        "mean_over": [name for name, record in per_task.items() if record.get("acc") is not None],
        "seconds": round(time.perf_counter() - started, 3),
    }


__all__ = ["TaskDataError", "TaskPlan", "ZeroShotPlan", "evaluate_zeroshot", "lm_eval_version", "mean_acc",
           "run_lm_eval", "stock_index", "summarize_results", "validate_zeroshot"]
