"""The `perp evaluate` stage: one `metrics.json` with everything a promotion gate needs.

For the evaluated model: perplexity on every configured text (`evaluate.perplexity`), zero-shot accuracy
(`evaluate.zeroshot`), and the decoder sparsity measured from the weights. Next to each number, the dense
baseline's, computed once and cached under `cache_dir("baselines")`, keyed by the dense model's content hash,
the data hash and the settings that change the number (window length, dtype, device, lm-eval and task versions,
limit, batch size). Then the relative figures the gates read: the perplexity ratio vs dense (the worst text; NaN
beats everything), the zero-shot mean and its drop vs dense in points, and the measured sparsity, next to the
planned sparsity the sparsity gate compares it with (the exact fraction of the decoder Linear weights the pruning
plan zeroes; per-row rounding keeps it off the nominal target).

The candidate's own reports say what it is held to: a pruned directory's prune_report.json, a recovered one's
recover_report.json (its `pruning` section, else the prune_report.json of the input it names, while that input
still holds the same weights). They give the target and planned sparsity (else the config's `prune` section)
and the dense model it was pruned from, the default baseline (else `model.name`). A baseline of another
architecture, a recorded base model that is gone or changed, and windows longer than either model's positions are
one-line errors before any weight is loaded.

Beside `metrics.json`, `plots/eval_perplexity.csv` and `plots/eval_zeroshot.csv` hold the same series for
`dvc plots`.
"""

from __future__ import annotations

from dataclasses import replace

import csv
import gc
import io
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch

from perp.config import PerpConfig, PerplexityTextConfig
from perp.errors import OutputError, PerpError
from perp.io.atomic import check_output_file, write_json_atomic
from perp.io.cache import cache_dir
from perp.io.hashing import sha256_bytes
from perp.layout import METRICS_FILE, PRUNE_REPORT, RECOVER_REPORT
from perp.lineage import recovery_input

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


_MAX_HOPS = 8  # recovered from recovered from ... pruned: how far back the reports are followed


@dataclass
class _Lineage:
    """What the candidate's own reports say about it: the dense model it was pruned from (`base`) and its pruning
    record (`pruning`: target_sparsity, planned_pruned_weights, config.prune, owl...), each with the report file
    that said so. Empty for a model without reports (the dense model, or a bare checkpoint)."""

    base: Optional[str] = None
    base_kind: Optional[str] = None
    base_sha256: Optional[str] = None
    base_from: Optional[str] = None  # "prune_report" or "recover_report"
    base_file: Optional[str] = None  # the report file naming the base model
    pruning: dict[str, Any] = field(default_factory=dict)
    pruning_from: Optional[str] = None  # "prune_report" or "recover_report"
    pruning_file: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def pruning_origin(self) -> str:
        """The report the pruning record came from; "prune_report" when there is none."""
        return self.pruning_from or "prune_report"


def _read_report(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, else {} (missing, unreadable or not an object)."""
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _take_prune_report(lineage: _Lineage, report: dict[str, Any], file: Path) -> None:
    """A pruned checkpoint's report names the model it was pruned from (the base: it beats a recover report's
    `dense`, with its sha256) and holds its pruning record (unless a nearer recover report copied it)."""
    base = report.get("base_model")
    base = base if isinstance(base, dict) else {}
    if _text(base.get("source")):
        lineage.base, lineage.base_kind = base["source"], _text(base.get("kind"))
        lineage.base_sha256, lineage.base_file = _text(base.get("sha256")), str(file)
        lineage.base_from = "prune_report"
    if not lineage.pruning:
        lineage.pruning, lineage.pruning_from, lineage.pruning_file = report, "prune_report", str(file)


def _take_recover_report(lineage: _Lineage, report: dict[str, Any], file: Path) -> None:
    """A recovered checkpoint's report: its `pruning` section (copied from its input's prune_report.json) and
    the dense reference it was recovered against (a fallback base when the input's report is out of reach)."""
    section = report.get("pruning")
    if isinstance(section, dict) and section and not lineage.pruning:
        lineage.pruning, lineage.pruning_from, lineage.pruning_file = section, "recover_report", str(file)
    recorded = section.get("base_model") if isinstance(section, dict) else None
    if lineage.base is None and isinstance(recorded, dict) and _text(recorded.get("source")):
        # the base the input's prune_report named, copied at recovery: it holds when the input is out of reach
        lineage.base, lineage.base_kind = recorded["source"], _text(recorded.get("kind"))
        lineage.base_sha256, lineage.base_file = _text(recorded.get("sha256")), str(file)
        lineage.base_from = "recover_report"
    if lineage.base is None and _text(report.get("dense")):
        lineage.base, lineage.base_sha256 = report["dense"], _text(report.get("dense_sha256"))
        lineage.base_from, lineage.base_file = "recover_report", str(file)


def _recover_input(report: dict[str, Any], lineage: _Lineage) -> Optional[Path]:
    """The local directory a recovered model was recovered from, when it still holds the same weights."""
    recorded = recovery_input(report)
    if recorded is None:
        return None
    if recorded.path is None and recorded.sha256 is not None and Path(recorded.source).expanduser().is_dir():
        lineage.notes.append(f"'{recorded.source}' changed since it was recovered from; its reports are not used")
    return recorded.path


def _pruned_base(lineage: _Lineage) -> Optional[Path]:
    """The recorded base model's directory when perp made it too (it has its own reports), else None."""
    if lineage.base is None or lineage.base_kind not in (None, "local"):
        return None
    path = Path(lineage.base).expanduser()
    if path.is_dir() and ((path / PRUNE_REPORT).is_file() or (path / RECOVER_REPORT).is_file()):
        return path
    return None


def _lineage(model_path: Path) -> _Lineage:
    """Walk the candidate's reports back to the pruning: a pruned directory's prune_report.json; a recovered
    directory's recover_report.json, then the input it names (while that is a local directory with the same
    weights). The nearest pruning record wins; the base model is the farthest one (iterative pruning: a base that
    perp pruned or recovered is followed to its own base); a prune_report's base beats a recover `dense`."""
    lineage = _Lineage()
    path: Optional[Path] = model_path
    seen: set[Path] = set()
    while path is not None and path.is_dir() and path.resolve() not in seen and len(seen) < _MAX_HOPS:
        seen.add(path.resolve())
        prune = _read_report(path / PRUNE_REPORT)
        if prune:
            _take_prune_report(lineage, prune, path / PRUNE_REPORT)
            path = _pruned_base(lineage)  # iterative pruning: the base was itself pruned (or recovered)
            continue
        recover = _read_report(path / RECOVER_REPORT)
        if not recover:
            break
        _take_recover_report(lineage, recover, path / RECOVER_REPORT)
        path = _recover_input(recover, lineage)
    return lineage


_GIVEN = ("--dense", "model.name")  # dense baselines the user named, as opposed to ones a report recorded


def _choose_dense(dense: Optional[str], lineage: _Lineage, config: PerpConfig) -> tuple[str, str]:
    """(dense spec, where it came from): `--dense`, else the base model the candidate's reports record
    ("prune_report" / "recover_report"), else `model.name`."""
    if dense:
        return dense, "--dense"
    if lineage.base and lineage.base_from:
        return lineage.base, lineage.base_from
    return config.model.name, "model.name"


def _resolve_dense(spec: str, origin: str, lineage: _Lineage, config: PerpConfig) -> tuple[str, Path]:
    """The dense model's (kind, local directory). A base model recorded by the candidate's report that is not
    here is a clear error, never a silent fall back to model.name."""
    from perp.config import classify_model_source
    from perp.models.loading import resolve_model_dir

    revision = _revision(spec, config)
    if origin in _GIVEN:
        classify_model_source(spec)
        return resolve_model_dir(spec, revision)
    try:
        if lineage.base_kind in ("local", "gguf") and not Path(spec).expanduser().exists():
            raise EvaluateError(f"'{spec}' does not exist")  # not a Hub id, whatever its spelling
        classify_model_source(spec)
        return resolve_model_dir(spec, revision)
    except PerpError as error:
        raise EvaluateError(f"{lineage.base_file} names the dense model '{spec}' the candidate was pruned from, "
                            f"which is not usable here ({error}); pass the dense model with --dense") from None


def _check_dense_identity(lineage: _Lineage, dense_spec: str, origin: str, dense_sha: str) -> None:
    """A recorded base model must still hold the weights that were pruned (its recorded sha256)."""
    if origin in _GIVEN or lineage.base_sha256 is None or lineage.base_sha256 == dense_sha:
        return
    raise EvaluateError(f"{lineage.base_file} names the dense model '{dense_spec}' with sha256 "
                        f"{lineage.base_sha256[:12]}, but '{dense_spec}' now has sha256 {dense_sha[:12]}; pass the "
                        "dense model with --dense")


_ARCHITECTURE = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")


def _check_same_architecture(model_config: Any, dense_config: Any, model: str, dense_spec: str,
                             origin: str) -> None:
    """The dense baseline must be the candidate's architecture: a ratio against another model means nothing."""
    from perp.evaluate.perplexity import config_value

    pairs = {key: (config_value(model_config, key), config_value(dense_config, key)) for key in _ARCHITECTURE}
    differences = [f"{key} {ours} vs {theirs}" for key, (ours, theirs) in pairs.items()
                   if ours is not None and theirs is not None and ours != theirs]
    if differences:
        raise EvaluateError(f"dense baseline '{dense_spec}' (from {origin}) is not the architecture of '{model}' "
                            f"(candidate vs dense: {', '.join(differences)}); pass the dense model it was pruned "
                            "from with --dense")


def _check_windows_fit(texts: list[PerplexityTextConfig], model_config: Any, dense_config: Any, model: str,
                       dense_spec: str) -> None:
    """Every perplexity text's windows must fit the positions of the candidate and of the dense model."""
    from perp.evaluate.perplexity import check_positions

    for index, text in enumerate(texts):
        key = f"evaluate.perplexity.{index}.seqlen (text '{text.name}')"  # no [...]: the CLI prints rich markup
        check_positions(model_config, text.seqlen, key, f"'{model}'")
        check_positions(dense_config, text.seqlen, key, f"the dense model '{dense_spec}'")


def _target_sparsity(report: dict[str, Any], is_dense: bool, config: PerpConfig,
                     origin: str = "prune_report") -> tuple[Optional[float], Optional[str]]:
    """The nominal pruning target: the model's pruning record (its `prune_report.json`, or for a recovered model
    its recover_report.json's `pruning` section or its input's prune_report.json; `origin` says which) when it has
    one, else the config's `prune` section (for a compressed model), else none (the dense model itself)."""
    value = report.get("target_sparsity")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), origin
    if is_dense:
        return None, None
    return float(config.prune.target_sparsity), "config"


def _planned_zeros(report: dict[str, Any], model: Any, family: Any, config: PerpConfig,
                   origin: str = "prune_report") -> tuple[Optional[int], Optional[str]]:
    """How many decoder Linear weights the pruning plan zeroes: `planned_pruned_weights` of the model's pruning
    record (see `_target_sparsity`; `origin` names it), else the plan of its recorded (or the config's) `prune`
    section on this model's shapes. Computed from the plan, never from the weights; None when that plan does not
    apply to this model."""
    count = report.get("planned_pruned_weights")
    if isinstance(count, int) and not isinstance(count, bool):
        return count, origin
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
        return planned_counts(model, family, plans, spec)[0], origin if recorded else "config"
    except (PerpError, ValueError):
        return None, None


def _perplexity(loaded: Any, token_set: Any, batch_size: int, offload: bool, name: str,
                progress_factory: Optional[ProgressFactory]) -> dict[str, Any]:
    """Whole-model perplexity, or with `offload` one decoder layer on the device at a time (same numbers)."""
    from perp.evaluate.layered import layered_perplexity
    from perp.evaluate.perplexity import perplexity

    if not offload:
        context = (progress_factory(f"perplexity {name}", token_set.num_windows) if progress_factory
                   else nullcontext(None))
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


def _worst_ratio(ratios: list[float]) -> Optional[float]:
    """The largest perplexity ratio; NaN (a diverged text) is the worst of all (max() would skip it when it
    follows a number, and a promotion gate would pass); None without ratios."""
    if any(math.isnan(ratio) for ratio in ratios):
        return math.nan
    return max(ratios, default=None)


def _drop_points(mean: Optional[float], dense_mean: Optional[float]) -> Optional[float]:
    if mean is None or dense_mean is None:
        return None
    return (dense_mean - mean) * 100.0


# --------------------------------------------------------------------------------------------- the stage


def run_evaluate(config: PerpConfig, model: str, out_path: Path, dense: Optional[str] = None, *,
                 progress_factory: Optional[ProgressFactory] = None, log: Optional[Log] = None) -> dict[str, Any]:
    """Evaluate `model` against the dense baseline; write metrics.json.

    The dense baseline is `dense`, else the model the candidate was pruned from as its reports record it
    (prune_report.json, or a recovered model's recover_report.json and the reports of its input), else
    `config.model.name`; it must be the candidate's architecture. The target and planned sparsity come from the
    same reports (else from the config's `prune` section). `out_path` is the metrics file (`.../metrics.json`)
    or a directory to hold it. Returns the metrics dict. Everything that can be checked without weights (texts
    via the config, window lengths against both models' positions, the dense model's identity and architecture,
    zero-shot tasks and their files) is checked before any model is loaded.
    """
    started = time.perf_counter()
    request = _check_request(config, model, dense, out_path)
    revision = _revision(model, config)
    baseline = _locate_dense(config, model, dense, revision, request, log)
    candidate = _evaluate_candidate(config, model, revision, request, baseline.lineage, progress_factory, log)
    is_dense = baseline.sha256 == candidate.sha256
    sparsity = _sparsity_figures(baseline.lineage, candidate, is_dense, config)
    dense_sets, dense_eval, cached_texts, cached_tasks = _baseline_numbers(
        config, baseline, candidate, request, is_dense, progress_factory, log)
    metrics = _compose_metrics(request.texts, candidate, baseline, sparsity, dense_eval)
    write_json_atomic(request.out_file, metrics)
    write_plot_series(metrics, request.out_file.parent / PLOTS_DIR)
    del dense_sets
    if log:
        cached = ", ".join(cached_texts + cached_tasks) or "nothing"
        log(f"wrote {request.out_file} in {time.perf_counter() - started:.1f}s "
            f"(dense baseline from the cache: {cached})")
    return metrics


def _revision(spec: str, config: PerpConfig) -> Optional[str]:
    """The configured `model.revision` for `model.name` itself; None for any other model."""
    return config.model.revision if spec == config.model.name else None


@dataclass
class _Request:
    """What `run_evaluate` was asked, checked before anything is read: the perplexity texts, the zero-shot plan
    (None without tasks), the device and dtype the models run in, and the metrics file to write."""

    texts: list[PerplexityTextConfig]
    zeroshot_plan: Any
    device: torch.device
    dtype: torch.dtype
    out_file: Path


def _check_request(config: PerpConfig, model: str, dense: Optional[str], out_path: Path) -> _Request:
    """The model specs, the zero-shot tasks and their files, that there is something to evaluate, and `out_path`."""
    from perp.config import classify_model_source
    from perp.evaluate.zeroshot import validate_zeroshot
    from perp.models import resolve_device_dtype

    classify_model_source(model)
    if dense:
        classify_model_source(dense)
    zs_cfg = config.evaluate.zeroshot
    plan = validate_zeroshot(zs_cfg.tasks, zs_cfg.task_data, zs_cfg.limit) if zs_cfg.tasks else None
    texts = list(config.evaluate.perplexity)
    if not texts and plan is None:
        raise EvaluateError("nothing to evaluate: evaluate.perplexity is empty and evaluate.zeroshot.tasks is empty")
    device, dtype = resolve_device_dtype(config.model.device, config.model.dtype)
    if Path(out_path).is_file() and Path(out_path).suffix != ".json":
        raise OutputError(f"--out '{out_path}' is an existing file without .json: name a .json file or a directory")
    return _Request(texts, plan, device, dtype, metrics_path_for(out_path))


@dataclass
class _Dense:
    """The dense baseline, chosen and checked before any weight is read: its spec, where that came from
    (`--dense`, a report, `model.name`), its local directory and content hash; and the candidate's lineage."""

    spec: str
    origin: str
    path: Path
    sha256: str
    lineage: _Lineage


def _locate_dense(config: PerpConfig, model: str, dense: Optional[str], revision: Optional[str],
                  request: _Request, log: Optional[Log]) -> _Dense:
    """What the candidate's reports say, and the dense baseline: checked before any weight is read."""
    from perp.evaluate.perplexity import read_model_config
    from perp.models.loading import model_content_hash, resolve_model_dir

    _, candidate_path = resolve_model_dir(model, revision)
    lineage = _lineage(candidate_path)
    dense_spec, dense_from = _choose_dense(dense, lineage, config)
    _, dense_path = _resolve_dense(dense_spec, dense_from, lineage, config)
    # metrics.json and plots/ never go into (or over) a model directory: registering it would upload them
    check_output_file(request.out_file, inputs=[candidate_path, dense_path])
    candidate_config, dense_config = read_model_config(candidate_path), read_model_config(dense_path)
    _check_same_architecture(candidate_config, dense_config, model, dense_spec, dense_from)
    _check_windows_fit(request.texts, candidate_config, dense_config, model, dense_spec)
    dense_sha = model_content_hash(dense_path)
    _check_dense_identity(lineage, dense_spec, dense_from, dense_sha)
    if log:
        for note in lineage.notes:
            log(note)
        if dense_from not in _GIVEN:
            log(f"dense baseline: {dense_spec} (recorded in {lineage.base_file})")
    return _Dense(dense_spec, dense_from, dense_path, dense_sha, lineage)


@dataclass
class _Candidate:
    """The evaluated model: what it is and what it scored, kept once its weights are released."""

    info: dict[str, Any]  # metrics.json's `model` section, less what names the dense baseline
    sha256: str
    measured: dict[str, Any]  # the decoder sparsity measured from the weights: sparsity, zeros, total
    token_sets: dict[str, Any]
    evaluated: _Evaluation
    tokenizer_fp: str
    planned_zeros: Optional[int]
    planned_from: Optional[str]


def _evaluate_candidate(config: PerpConfig, model: str, revision: Optional[str], request: _Request,
                        lineage: _Lineage, progress_factory: Optional[ProgressFactory],
                        log: Optional[Log]) -> _Candidate:
    """Load the evaluated model, score it, count what its pruning plan zeroes, and release it."""
    from perp.models import load_model

    offload = config.evaluate.offload
    loaded = load_model(model, config.model.device, config.model.dtype, revision, load_to_device=not offload)
    model_sha = loaded.content_hash
    measured = loaded.family.decoder_sparsity(loaded.model)
    token_sets = _token_sets(request.texts, loaded.tokenizer)
    if log:
        log(f"evaluating {model} ({loaded.family.name}, sparsity {measured['sparsity']:.4f}) "
            f"on {request.device}/{request.dtype}")
    evaluated = _evaluate_model(loaded, token_sets, config.evaluate.batch_size, request.zeroshot_plan,
                                config.evaluate.zeroshot, progress_factory=progress_factory, log=log,
                                offload=offload)
    info = _model_info(loaded, model, model_sha, measured, request)
    tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)
    planned_zeros, planned_from = _planned_zeros(lineage.pruning, loaded.model, loaded.family, config,
                                                 lineage.pruning_origin)
    del loaded
    _release()
    return _Candidate(info, model_sha, measured, token_sets, evaluated, tokenizer_fp, planned_zeros, planned_from)


def _model_info(loaded: Any, model: str, model_sha: str, measured: dict[str, Any],
                request: _Request) -> dict[str, Any]:
    """metrics.json's `model` section as far as the evaluated model itself tells it."""
    return {"source": model, "sha256": model_sha, "path": str(Path(loaded.path).resolve()),
            "family": loaded.family.name, "model_type": loaded.model.config.model_type,
            "dtype": str(request.dtype).removeprefix("torch."), "device": str(request.device),
            "decoder_linear_zeros": measured["zeros"], "decoder_linear_weights": measured["total"]}


@dataclass
class _Sparsity:
    """The sparsity the candidate is held to: the nominal target, and the plan's exact fraction with its count of
    zeroed weights, each with where it came from. No plan for the dense model itself."""

    target: Optional[float]
    target_from: Optional[str]
    planned: Optional[float]
    planned_from: Optional[str]
    planned_zeros: Optional[int]


def _sparsity_figures(lineage: _Lineage, candidate: _Candidate, is_dense: bool, config: PerpConfig) -> _Sparsity:
    """The target and planned sparsity of the candidate, from its pruning record (else the config)."""
    target, target_from = _target_sparsity(lineage.pruning, is_dense, config, lineage.pruning_origin)
    if is_dense:
        return _Sparsity(target, target_from, None, None, None)
    total = candidate.measured["total"]
    # What the sparsity gate compares the measured sparsity with: the plan's exact count over the same weights.
    planned = candidate.planned_zeros / total if candidate.planned_zeros is not None and total else None
    return _Sparsity(target, target_from, planned, candidate.planned_from, candidate.planned_zeros)


# --------------------------------------------------------------------------------------------- the dense baseline


def _baseline_numbers(config: PerpConfig, baseline: _Dense, candidate: _Candidate, request: _Request,
                      is_dense: bool, progress_factory: Optional[ProgressFactory], log: Optional[Log]
                      ) -> tuple[dict[str, Any], _Evaluation, list[str], list[str]]:
    """The dense baseline's token sets and numbers, and the texts and tasks that came from the cache: from the
    cache, else computed once and cached."""
    if not is_dense:
        return _dense_baseline(config, baseline, candidate, request, progress_factory, log)
    _cache_own_numbers(baseline.sha256, candidate.evaluated, request)
    # the model is the dense model: its own numbers are the baseline
    return candidate.token_sets, candidate.evaluated, [], []


def _cache_own_numbers(dense_sha: str, evaluated: _Evaluation, request: _Request) -> None:
    """Cache the numbers of the dense model, evaluated as the candidate, as its baseline."""
    for name, result in evaluated.perplexity.items():
        text = next(t for t in request.texts if t.name == name)
        key = _ppl_key(dense_sha, text, result["data_sha256"], request.dtype, request.device)
        write_baseline("perplexity", key, result)
    if evaluated.zeroshot:
        for task, record in evaluated.zeroshot["tasks"].items():
            key = _zeroshot_key(dense_sha, task, record, evaluated.zeroshot, request.dtype, request.device)
            write_baseline("zeroshot", key, record)


@dataclass
class _BaselineNumbers:
    """The dense baseline's numbers found so far, per text and per task, and the cache key of each."""

    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    ppl_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, Any]] = field(default_factory=dict)
    zs_keys: dict[str, dict[str, Any]] = field(default_factory=dict)


def _dense_baseline(config: PerpConfig, baseline: _Dense, candidate: _Candidate, request: _Request,
                    progress_factory: Optional[ProgressFactory], log: Optional[Log]
                    ) -> tuple[dict[str, Any], _Evaluation, list[str], list[str]]:
    """The dense model's token sets and numbers, and the texts and tasks the cache held; the dense model is
    loaded (once) only for what the cache lacks."""
    dense_sets = _dense_token_sets(baseline.path, request.texts, candidate)
    numbers = _cached_baseline(baseline.sha256, dense_sets, candidate.evaluated, request)
    cached_texts, cached_tasks = sorted(numbers.perplexity), sorted(numbers.zeroshot)
    missing_texts = {t.name for t in request.texts} - set(numbers.perplexity)
    missing_tasks = [task for task in numbers.zs_keys if task not in numbers.zeroshot]
    if missing_texts or missing_tasks:
        if log:
            log(f"dense baseline {baseline.spec}: computing {', '.join(sorted(missing_texts) + missing_tasks)} "
                f"(cached: {', '.join(cached_texts + cached_tasks) or 'none'})")
        _compute_baseline(config, baseline, dense_sets, request, numbers, missing_texts, missing_tasks,
                          progress_factory, log)
    elif log:
        log(f"dense baseline {baseline.spec}: every number from the cache")
    zeroshot = {"tasks": numbers.zeroshot} if candidate.evaluated.zeroshot is not None else None
    return dense_sets, _Evaluation(numbers.perplexity, zeroshot), cached_texts, cached_tasks


def _dense_token_sets(dense_path: Path, texts: list[PerplexityTextConfig], candidate: _Candidate) -> dict[str, Any]:
    """The texts as the dense tokenizer reads them: the candidate's own token sets when the tokenizers agree."""
    from perp.models.loading import tokenizer_from

    dense_tokenizer = tokenizer_from(dense_path, EvaluateError)
    same_tokens = tokenizer_fingerprint(dense_tokenizer) == candidate.tokenizer_fp
    return candidate.token_sets if same_tokens else _token_sets(texts, dense_tokenizer)


def _cached_baseline(dense_sha: str, dense_sets: dict[str, Any], evaluated: _Evaluation,
                     request: _Request) -> _BaselineNumbers:
    """The dense numbers the cache holds for every text and for every task the candidate was scored on."""
    numbers = _BaselineNumbers()
    for text in request.texts:
        key = _ppl_key(dense_sha, text, dense_sets[text.name].hash, request.dtype, request.device)
        numbers.ppl_keys[text.name] = key
        cached = read_baseline("perplexity", key)
        if cached is not None:
            numbers.perplexity[text.name] = cached
    if evaluated.zeroshot is not None:
        for task, record in evaluated.zeroshot["tasks"].items():
            key = _zeroshot_key(dense_sha, task, record, evaluated.zeroshot, request.dtype, request.device)
            numbers.zs_keys[task] = key
            cached = read_baseline("zeroshot", key)
            if cached is not None:
                numbers.zeroshot[task] = cached
    return numbers


def _compute_baseline(config: PerpConfig, baseline: _Dense, dense_sets: dict[str, Any], request: _Request,
                      numbers: _BaselineNumbers, missing_texts: set[str], missing_tasks: list[str],
                      progress_factory: Optional[ProgressFactory], log: Optional[Log]) -> None:
    """Evaluate the dense model on the texts and tasks the cache lacks; cache each number and add it to `numbers`."""
    from perp.models import load_model

    loaded = load_model(baseline.spec, config.model.device, config.model.dtype, _revision(baseline.spec, config),
                        load_to_device=not config.evaluate.offload)
    if loaded.content_hash != baseline.sha256:  # pragma: no cover - the files changed underneath us
        raise EvaluateError(f"dense model '{baseline.spec}' changed while being evaluated")
    fresh = _evaluate_model(loaded, dense_sets, config.evaluate.batch_size, request.zeroshot_plan,
                            config.evaluate.zeroshot, only_texts=missing_texts, only_tasks=missing_tasks,
                            progress_factory=progress_factory, log=log, offload=config.evaluate.offload)
    del loaded
    _release()
    for name, result in fresh.perplexity.items():
        write_baseline("perplexity", numbers.ppl_keys[name], result)
        numbers.perplexity[name] = result
    if fresh.zeroshot is not None:
        for task, record in fresh.zeroshot["tasks"].items():
            write_baseline("zeroshot", numbers.zs_keys[task], record)
            numbers.zeroshot[task] = record


# --------------------------------------------------------------------------------------------- metrics.json


def _compose_metrics(texts: list[PerplexityTextConfig], candidate: _Candidate, baseline: _Dense,
                     sparsity: _Sparsity, dense_eval: _Evaluation) -> dict[str, Any]:
    """The metrics dict: the candidate's numbers next to the dense baseline's, and the figures the gates read."""
    perplexity_section = _perplexity_section(texts, candidate.evaluated, dense_eval)
    zeroshot_section = _zeroshot_section(candidate.evaluated, dense_eval)
    ratios = [entry["ratio"] for entry in perplexity_section.values() if entry["ratio"] is not None]
    lineage = baseline.lineage
    return {
        "model": {**candidate.info, "dense_source": baseline.spec, "dense_sha256": baseline.sha256,
                  "dense_from": baseline.origin, "target_sparsity_from": sparsity.target_from,
                  "planned_sparsity_from": sparsity.planned_from,
                  "pruning_record": lineage.pruning_file if lineage.pruning else None},
        "sparsity": candidate.measured["sparsity"],
        "target_sparsity": sparsity.target,
        "planned_sparsity": sparsity.planned,
        "planned_pruned_weights": sparsity.planned_zeros,
        "perplexity": perplexity_section,
        "zeroshot": zeroshot_section,
        "gates": {
            "ppl_ratio": _worst_ratio(ratios),
            "zeroshot_drop_points": zeroshot_section["drop_points"] if zeroshot_section else None,
            "sparsity": candidate.measured["sparsity"],
        },
    }


def _perplexity_section(texts: list[PerplexityTextConfig], evaluated: _Evaluation,
                        dense_eval: _Evaluation) -> dict[str, dict[str, Any]]:
    """metrics.json's `perplexity`: per text, the candidate's and the dense perplexity and their ratio, and the mean
    token NLLs they come from (finite where a diverged model's perplexity overflows, which JSON writes as null)."""
    section: dict[str, dict[str, Any]] = {}
    for text in texts:
        result = evaluated.perplexity[text.name]
        dense_result = dense_eval.perplexity[text.name]
        section[text.name] = {
            "ppl": result["ppl"], "dense_ppl": dense_result["ppl"], "ratio": _ratio(result["ppl"], dense_result["ppl"]),
            "nll": result.get("nll"), "dense_nll": dense_result.get("nll"),
            "tokens": result["tokens"], "windows": result["windows"], "seqlen": result["seqlen"],
            "data_sha256": result["data_sha256"], "source": text.source,
        }
    return section


def _zeroshot_section(evaluated: _Evaluation, dense_eval: _Evaluation) -> Optional[dict[str, Any]]:
    """metrics.json's `zeroshot`: per task the candidate's and the dense accuracy and the drop, then the means
    and the settings; None when no zero-shot task ran."""
    if evaluated.zeroshot is None:
        return None
    from perp.evaluate.zeroshot import mean_acc

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
    dense_mean = mean_acc({t: {"acc": r["dense_acc"]} for t, r in tasks_section.items() if r["acc"] is not None})
    return {
        "tasks": tasks_section, "mean_acc": zs["mean_acc"], "dense_mean_acc": dense_mean,
        "drop_points": _drop_points(zs["mean_acc"], dense_mean), "mean_over": zs["mean_over"],
        "lm_eval_version": zs["lm_eval_version"], "limit": zs["limit"], "num_fewshot": zs["num_fewshot"],
        "batch_size": zs["batch_size"], "task_data": zs["task_data"],
    }


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
