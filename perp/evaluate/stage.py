"""The `perp evaluate` stage: one `metrics.json` with everything a promotion gate needs.

For the evaluated model: perplexity on every configured text (`evaluate.perplexity`), zero-shot accuracy
(`evaluate.zeroshot`), and the decoder sparsity measured from the weights. Next to each number, the dense
baseline's, computed once and cached under `cache_dir("baselines")`, keyed by the dense model's content hash,
the data hash and the settings that change the number (window length, dtype, device, lm-eval and task versions,
limit, batch size). Then the relative figures the gates read: the perplexity ratio vs dense (the worst text), the
zero-shot mean and its drop vs dense in points, and the measured sparsity, next to the planned sparsity the
sparsity gate compares it with (the exact fraction of the decoder Linear weights the pruning plan zeroes, from the
model's prune_report.json or the plan of the `prune` section; per-row rounding keeps it off the nominal target).

Beside `metrics.json`, `plots/eval_perplexity.csv` and `plots/eval_zeroshot.csv` hold the same series for
`dvc plots`.
"""

from __future__ import annotations

from dataclasses import replace

import csv
import gc
import io
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch

from perp.config import PerpConfig, PerplexityTextConfig
from perp.errors import PerpError
from perp.io.atomic import write_json_atomic
from perp.io.cache import cache_dir
from perp.io.hashing import sha256_bytes

METRICS_FILE = "metrics.json"
PLOTS_DIR = "plots"
_BASELINE_FORMAT = 1

#: progress_factory(description, total) -> a context manager yielding advance(n).
ProgressFactory = Callable[[str, int], ContextManager[Callable[..., None]]]
Log = Callable[[str], None]


class EvaluateError(PerpError):
    """The evaluation stage cannot run as asked."""


def metrics_path_for(out_path: str | Path) -> Path:
    """`out/metrics.json` as given, or `DIR/metrics.json` when `out_path` is a directory (or has no .json suffix)."""
    path = Path(out_path)
    return path if path.suffix == ".json" else path / METRICS_FILE


# --------------------------------------------------------------------------------------------- baseline cache


def _baseline_file(kind: str, key: dict[str, Any]) -> Path:
    digest = sha256_bytes(json.dumps({"format": _BASELINE_FORMAT, **key}, sort_keys=True, default=str).encode())
    return cache_dir("baselines") / f"{kind}-{digest[:40]}.json"


def read_baseline(kind: str, key: dict[str, Any]) -> Optional[dict[str, Any]]:
    path = _baseline_file(kind, key)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record.get("result") if record.get("key") == key else None


def write_baseline(kind: str, key: dict[str, Any], result: dict[str, Any]) -> Path:
    path = _baseline_file(kind, key)
    write_json_atomic(path, {"key": key, "result": result, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


def _ppl_key(dense_sha: str, text: PerplexityTextConfig, data_sha: str, dtype: torch.dtype,
             device: torch.device) -> dict[str, Any]:
    return {"kind": "perplexity", "dense_sha256": dense_sha, "data_sha256": data_sha, "seqlen": text.seqlen,
            "dtype": str(dtype).removeprefix("torch."), "device": device.type}


def _zeroshot_key(dense_sha: str, task: str, record: dict[str, Any], zs: dict[str, Any], dtype: torch.dtype,
                  device: torch.device) -> dict[str, Any]:
    return {"kind": "zeroshot", "dense_sha256": dense_sha, "task": task, "task_version": record.get("version"),
            "lm_eval_version": zs["lm_eval_version"], "data_sha256": record.get("data_sha256"),
            "dataset": record.get("dataset"), "split": record.get("split"), "limit": zs["limit"],
            "num_fewshot": zs["num_fewshot"], "batch_size": zs["batch_size"],
            "dtype": str(dtype).removeprefix("torch."), "device": device.type}


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class _Evaluation:
    """What one model scored: perplexity per text name, and lm-eval's zero-shot summary."""

    perplexity: dict[str, dict[str, Any]]
    zeroshot: Optional[dict[str, Any]]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Equal fingerprints mean the same token ids for any text (fast tokenizers: the whole serialized pipeline)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # pragma: no cover - slow tokenizers
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps({"cls": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                        "bos": getattr(tokenizer, "add_bos_token", None),
                        "eos": getattr(tokenizer, "add_eos_token", None)}, sort_keys=True, default=str)
    return sha256_bytes((payload + extra).encode())


def _token_sets(texts: list[PerplexityTextConfig], tokenizer: Any) -> dict[str, Any]:
    from perp.data import evaluation_set

    return {text.name: evaluation_set(text, tokenizer) for text in texts}


def _release() -> None:
    """Return the memory of a model the caller has just dropped (before the next one is loaded)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prune_report(model_path: Path) -> dict[str, Any]:
    """The model's own `prune_report.json` (a pruned checkpoint has one), else {}."""
    report_file = model_path / "prune_report.json" if model_path.is_dir() else None
    if report_file is None or not report_file.is_file():
        return {}
    try:
        report = json.loads(report_file.read_text())
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _target_sparsity(report: dict[str, Any], is_dense: bool, config: PerpConfig) -> tuple[Optional[float], Optional[str]]:
    """The nominal pruning target: the model's own `prune_report.json` when it has one, else the config's `prune`
    section (for a compressed model), else none (the dense model itself)."""
    value = report.get("target_sparsity")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "prune_report"
    if is_dense:
        return None, None
    return float(config.prune.target_sparsity), "config"


def _planned_zeros(report: dict[str, Any], model: Any, family: Any, config: PerpConfig) -> tuple[Optional[int], Optional[str]]:
    """How many decoder Linear weights the pruning plan zeroes: `planned_pruned_weights` of the model's own
    `prune_report.json`, else the plan of its recorded (or the config's) `prune` section on this model's shapes.
    Computed from the plan, never from the weights; None when that plan does not apply to this model."""
    count = report.get("planned_pruned_weights")
    if isinstance(count, int) and not isinstance(count, bool):
        return count, "prune_report"
    from perp.config import PruneConfig
    from perp.prune.patterns import PruneSpec
    from perp.prune.selection import plan_pruning, planned_counts

    recorded = (report.get("config") or {}).get("prune") if isinstance(report.get("config"), dict) else None
    try:
        prune = PruneConfig.model_validate(recorded) if isinstance(recorded, dict) else config.prune
        spec = PruneSpec.from_config(prune)
        plans = plan_pruning(model, family, prune.include, prune.exclude, spec)
        if prune.owl_lambda > 0:  # OWL's layer sparsities came from data: only its report knows them
            chosen = (report.get("owl") or {}).get("layer_sparsity")
            if not isinstance(chosen, dict):
                return None, None
            plans = [replace(plan, sparsity=float(chosen[str(plan.index)])) if str(plan.index) in chosen else plan
                     for plan in plans]
        return planned_counts(model, family, plans, spec)[0], "prune_report" if recorded else "config"
    except (PerpError, ValueError):
        return None, None


def _perplexity(loaded: Any, token_set: Any, batch_size: int, offload: bool, name: str,
                progress_factory: Optional[ProgressFactory]) -> dict[str, Any]:
    """Whole-model perplexity, or with `offload` one decoder layer on the device at a time (same numbers)."""
    from perp.evaluate.layered import layered_perplexity
    from perp.evaluate.perplexity import perplexity

    if not offload:
        context = progress_factory(f"perplexity {name}", token_set.num_windows) if progress_factory else nullcontext(None)
        with context as advance:
            return perplexity(loaded.model, token_set, batch_size, progress=advance).as_dict()
    layers = loaded.family.num_layers(loaded.model)
    context = progress_factory(f"perplexity {name} (layers)", layers) if progress_factory else nullcontext(None)
    with context as advance:
        step = (lambda done, total: advance(1)) if advance else None
        return layered_perplexity(loaded.model, loaded.family, token_set, loaded.device, batch_size,
                                  progress=step).as_dict()


def _evaluate_model(loaded: Any, token_sets: dict[str, Any], batch_size: int,
                    zeroshot_plan: Any, zs_settings: Any, only_texts: Optional[set[str]] = None,
                    only_tasks: Optional[list[str]] = None, progress_factory: Optional[ProgressFactory] = None,
                    log: Optional[Log] = None, offload: bool = False) -> _Evaluation:
    model, tokenizer = loaded.model, loaded.tokenizer
    results: dict[str, dict[str, Any]] = {}
    for name, token_set in token_sets.items():
        if only_texts is not None and name not in only_texts:
            continue
        results[name] = _perplexity(loaded, token_set, batch_size, offload, name, progress_factory)
        if log:
            log(f"perplexity {name}: {results[name]['ppl']:.4f} ({results[name]['tokens']} tokens)")
    zeroshot = None
    if zeroshot_plan is not None and (only_tasks is None or only_tasks):
        from perp.evaluate.zeroshot import ZeroShotPlan, evaluate_zeroshot

        plan = zeroshot_plan
        if only_tasks is not None and set(only_tasks) != set(plan.names):
            keep = [p for p in plan.plans if p.name in only_tasks]
            tasks = [t for p, t in zip(plan.plans, plan.tasks or []) if p.name in only_tasks] if plan.tasks else None
            plan = ZeroShotPlan(plans=keep, task_data=plan.task_data, limit=plan.limit,
                                configs={p.name: plan.configs[p.name] for p in keep if p.name in plan.configs},
                                tasks=tasks)
        if log:
            log(f"zero-shot: {', '.join(plan.names)} (limit {plan.limit})")
        zeroshot = evaluate_zeroshot(model, tokenizer, plan.names, plan.task_data, plan.limit,
                                     zs_settings.batch_size, plan=plan)
    return _Evaluation(results, zeroshot)


def _ratio(value: Optional[float], dense: Optional[float]) -> Optional[float]:
    if value is None or dense is None or dense == 0:
        return None
    return value / dense


def _drop_points(mean: Optional[float], dense_mean: Optional[float]) -> Optional[float]:
    if mean is None or dense_mean is None:
        return None
    return (dense_mean - mean) * 100.0


# --------------------------------------------------------------------------------------------- the stage


def run_evaluate(config: PerpConfig, model: str, out_path: Path, dense: Optional[str] = None, *,
                 progress_factory: Optional[ProgressFactory] = None, log: Optional[Log] = None) -> dict[str, Any]:
    """Evaluate `model` against the dense baseline (`dense`, default `config.model.name`); write metrics.json.

    `out_path` is the metrics file (`.../metrics.json`) or a directory to hold it. Returns the metrics dict.
    Everything that can be checked without weights (texts via the config, zero-shot tasks and their files) is
    checked before any model is loaded.
    """
    from perp.config import classify_model_source
    from perp.evaluate.zeroshot import validate_zeroshot
    from perp.models import load_model, resolve_device_dtype
    from perp.models.loading import LoadedModel, resolve_model_dir

    started = time.perf_counter()
    dense_spec = dense or config.model.name
    classify_model_source(model)
    classify_model_source(dense_spec)
    zs_cfg = config.evaluate.zeroshot
    plan = validate_zeroshot(zs_cfg.tasks, zs_cfg.task_data, zs_cfg.limit) if zs_cfg.tasks else None
    texts = list(config.evaluate.perplexity)
    if not texts and plan is None:
        raise EvaluateError("nothing to evaluate: evaluate.perplexity is empty and evaluate.zeroshot.tasks is empty")
    device, dtype = resolve_device_dtype(config.model.device, config.model.dtype)
    out_file = metrics_path_for(out_path)

    # ---- the evaluated model
    revision = config.model.revision if model == config.model.name else None
    offload = config.evaluate.offload
    loaded = load_model(model, config.model.device, config.model.dtype, revision, load_to_device=not offload)
    model_sha = loaded.content_hash
    measured = loaded.family.decoder_sparsity(loaded.model)
    token_sets = _token_sets(texts, loaded.tokenizer)
    if log:
        log(f"evaluating {model} ({loaded.family.name}, sparsity {measured['sparsity']:.4f}) on {device}/{dtype}")
    evaluated = _evaluate_model(loaded, token_sets, config.evaluate.batch_size, plan, zs_cfg,
                                progress_factory=progress_factory, log=log, offload=offload)
    model_info = {"source": model, "sha256": model_sha, "path": str(Path(loaded.path).resolve()),
                  "family": loaded.family.name, "model_type": loaded.model.config.model_type,
                  "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                  "decoder_linear_zeros": measured["zeros"], "decoder_linear_weights": measured["total"]}
    model_tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)
    model_path = Path(loaded.path)
    prune_report = _prune_report(model_path)
    planned_zeros, planned_from = _planned_zeros(prune_report, loaded.model, loaded.family, config)
    del loaded
    _release()

    # ---- the dense baseline: from the cache, else computed once and cached
    dense_kind, dense_path = resolve_model_dir(dense_spec, config.model.revision if dense_spec == config.model.name else None)
    dense_sha = LoadedModel(model=None, tokenizer=None, family=None, source=dense_spec, kind=dense_kind,  # type: ignore[arg-type]
                            path=dense_path, device=device, dtype=dtype).content_hash
    is_dense = dense_sha == model_sha
    target, target_from = _target_sparsity(prune_report, is_dense, config)
    # What the sparsity gate compares the measured sparsity with: the plan's exact count over the same weights.
    planned = planned_zeros / measured["total"] if planned_zeros is not None and measured["total"] else None
    if is_dense:
        planned, planned_from, planned_zeros = None, None, None

    if is_dense:
        dense_sets = token_sets
        dense_eval = evaluated
        for name, result in evaluated.perplexity.items():
            text = next(t for t in texts if t.name == name)
            write_baseline("perplexity", _ppl_key(dense_sha, text, result["data_sha256"], dtype, device), result)
        if evaluated.zeroshot:
            for task, record in evaluated.zeroshot["tasks"].items():
                write_baseline("zeroshot", _zeroshot_key(dense_sha, task, record, evaluated.zeroshot, dtype, device),
                               record)
        cached_texts, cached_tasks = [], []  # the model is the dense model: its own numbers are the baseline
    else:
        dense_sets, dense_eval, cached_texts, cached_tasks = _dense_baseline(
            config, dense_spec, dense_path, dense_sha, texts, token_sets, model_tokenizer_fp, plan, evaluated,
            device, dtype, progress_factory, log)

    # ---- compose
    perplexity_section: dict[str, dict[str, Any]] = {}
    for text in texts:
        result = evaluated.perplexity[text.name]
        dense_result = dense_eval.perplexity[text.name]
        perplexity_section[text.name] = {
            "ppl": result["ppl"], "dense_ppl": dense_result["ppl"], "ratio": _ratio(result["ppl"], dense_result["ppl"]),
            "tokens": result["tokens"], "windows": result["windows"], "seqlen": result["seqlen"],
            "data_sha256": result["data_sha256"], "source": text.source,
        }
    zeroshot_section = None
    if evaluated.zeroshot is not None:
        zs, dense_zs = evaluated.zeroshot, dense_eval.zeroshot or {"tasks": {}}
        tasks_section = {}
        for task, record in zs["tasks"].items():
            dense_record = dense_zs["tasks"].get(task, {})
            tasks_section[task] = {
                **{k: record.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "version",
                                              "num_fewshot", "samples", "total", "split", "dataset", "data_sha256")},
                "dense_acc": dense_record.get("acc"), "dense_acc_norm": dense_record.get("acc_norm"),
                "drop_points": _drop_points(record.get("acc"), dense_record.get("acc")),
            }
        from perp.evaluate.zeroshot import mean_acc

        dense_mean = mean_acc({t: {"acc": r["dense_acc"]} for t, r in tasks_section.items() if r["acc"] is not None})
        zeroshot_section = {
            "tasks": tasks_section, "mean_acc": zs["mean_acc"], "dense_mean_acc": dense_mean,
            "drop_points": _drop_points(zs["mean_acc"], dense_mean), "mean_over": zs["mean_over"],
            "lm_eval_version": zs["lm_eval_version"], "limit": zs["limit"], "num_fewshot": zs["num_fewshot"],
            "batch_size": zs["batch_size"], "task_data": zs["task_data"],
        }
    ratios = [entry["ratio"] for entry in perplexity_section.values() if entry["ratio"] is not None]
    metrics = {
        "model": {**model_info, "dense_source": dense_spec, "dense_sha256": dense_sha,
                  "target_sparsity_from": target_from, "planned_sparsity_from": planned_from},
        "sparsity": measured["sparsity"],
        "target_sparsity": target,
        "planned_sparsity": planned,
        "planned_pruned_weights": planned_zeros,
        "perplexity": perplexity_section,
        "zeroshot": zeroshot_section,
        "gates": {
            "ppl_ratio": max(ratios) if ratios else None,
            "zeroshot_drop_points": zeroshot_section["drop_points"] if zeroshot_section else None,
            "sparsity": measured["sparsity"],
        },
    }
    write_json_atomic(out_file, metrics)
    write_plot_series(metrics, out_file.parent / PLOTS_DIR)
    del dense_sets
    if log:
        cached = ", ".join(cached_texts + cached_tasks) or "nothing"
        log(f"wrote {out_file} in {time.perf_counter() - started:.1f}s (dense baseline from the cache: {cached})")
    return metrics


def _dense_baseline(config: PerpConfig, dense_spec: str, dense_path: Path, dense_sha: str,
                    texts: list[PerplexityTextConfig], token_sets: dict[str, Any], model_tokenizer_fp: str,
                    plan: Any, evaluated: _Evaluation, device: torch.device, dtype: torch.dtype,
                    progress_factory: Optional[ProgressFactory], log: Optional[Log]
                    ) -> tuple[dict[str, Any], _Evaluation, list[str], list[str]]:
    from transformers import AutoTokenizer

    from perp.models import load_model

    try:
        dense_tokenizer = AutoTokenizer.from_pretrained(dense_path, local_files_only=True)
    except OSError as error:
        raise EvaluateError(f"cannot load the dense tokenizer from '{dense_path}': {str(error).splitlines()[0]}") from None
    same_tokens = tokenizer_fingerprint(dense_tokenizer) == model_tokenizer_fp
    dense_sets = token_sets if same_tokens else _token_sets(texts, dense_tokenizer)

    perplexity: dict[str, dict[str, Any]] = {}
    ppl_keys: dict[str, dict[str, Any]] = {}
    for text in texts:
        key = _ppl_key(dense_sha, text, dense_sets[text.name].hash, dtype, device)
        ppl_keys[text.name] = key
        cached = read_baseline("perplexity", key)
        if cached is not None:
            perplexity[text.name] = cached
    zs_tasks: dict[str, dict[str, Any]] = {}
    zs_keys: dict[str, dict[str, Any]] = {}
    if evaluated.zeroshot is not None:
        for task, record in evaluated.zeroshot["tasks"].items():
            key = _zeroshot_key(dense_sha, task, record, evaluated.zeroshot, dtype, device)
            zs_keys[task] = key
            cached = read_baseline("zeroshot", key)
            if cached is not None:
                zs_tasks[task] = cached
    cached_texts, cached_tasks = sorted(perplexity), sorted(zs_tasks)
    missing_texts = {t.name for t in texts} - set(perplexity)
    missing_tasks = [task for task in zs_keys if task not in zs_tasks]
    if missing_texts or missing_tasks:
        if log:
            log(f"dense baseline {dense_spec}: computing {', '.join(sorted(missing_texts) + missing_tasks)} "
                f"(cached: {', '.join(cached_texts + cached_tasks) or 'none'})")
        loaded = load_model(dense_spec, config.model.device, config.model.dtype,
                            config.model.revision if dense_spec == config.model.name else None,
                            load_to_device=not config.evaluate.offload)
        if loaded.content_hash != dense_sha:  # pragma: no cover - the files changed underneath us
            raise EvaluateError(f"dense model '{dense_spec}' changed while being evaluated")
        fresh = _evaluate_model(loaded, dense_sets, config.evaluate.batch_size, plan,
                                config.evaluate.zeroshot, only_texts=missing_texts, only_tasks=missing_tasks,
                                progress_factory=progress_factory, log=log, offload=config.evaluate.offload)
        del loaded
        _release()
        for name, result in fresh.perplexity.items():
            write_baseline("perplexity", ppl_keys[name], result)
            perplexity[name] = result
        if fresh.zeroshot is not None:
            for task, record in fresh.zeroshot["tasks"].items():
                write_baseline("zeroshot", zs_keys[task], record)
                zs_tasks[task] = record
    elif log:
        log(f"dense baseline {dense_spec}: every number from the cache")
    zeroshot = {"tasks": zs_tasks} if evaluated.zeroshot is not None else None
    return dense_sets, _Evaluation(perplexity, zeroshot), cached_texts, cached_tasks


# --------------------------------------------------------------------------------------------- plot series


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if value is None else value for value in row])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(path)


def write_plot_series(metrics: dict[str, Any], directory: Path) -> list[Path]:
    """`eval_perplexity.csv` (text, dense_ppl, ppl, ratio) and `eval_zeroshot.csv` (task, dense_acc, acc, ...),
    one row per text or task, for `dvc plots` (e.g. x: text, y: [dense_ppl, ppl])."""
    written = []
    ppl_rows = [[name, e["dense_ppl"], e["ppl"], e["ratio"]] for name, e in metrics["perplexity"].items()]
    path = directory / "eval_perplexity.csv"
    _write_csv(path, ["text", "dense_ppl", "ppl", "ratio"], ppl_rows)
    written.append(path)
    zs = metrics.get("zeroshot")
    if zs:
        rows = [[task, r.get("dense_acc"), r.get("acc"), r.get("dense_acc_norm"), r.get("acc_norm")]
                for task, r in zs["tasks"].items()]
        rows.append(["mean", zs.get("dense_mean_acc"), zs.get("mean_acc"), None, None])
        path = directory / "eval_zeroshot.csv"
        _write_csv(path, ["task", "dense_acc", "acc", "dense_acc_norm", "acc_norm"], rows)
        written.append(path)
    return written


__all__ = [
    "METRICS_FILE",
    "EvaluateError",
    "metrics_path_for",
    "read_baseline",
    "run_evaluate",
    "tokenizer_fingerprint",
    "write_baseline",
    "write_plot_series",
]
