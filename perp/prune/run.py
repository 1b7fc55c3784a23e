"""`run_prune`: the mask stage as one library call, shared by the CLI, `perp run`, Prefect and DVC.

Output directory (written atomically: it appears whole or not at all):

- a Hugging Face checkpoint (`save_pretrained`, safetensors) with exact zeros in place, and the tokenizer;
- `masks.safetensors`: the kept-masks as bitmasks (`perp.prune.masks.load_masks`);
- `prune_report.json`: method, pattern, target and achieved sparsity, per-Linear sparsity and reconstruction
  error, time per phase, peak memory, the full config, the calibration token hash and the base model hash.
"""

from __future__ import annotations

import os
from dataclasses import replace
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from perp.config import PerpConfig, PruneConfig, dump_params, recorded_model_source, validate_section
from perp.data.windows import TokenSet
from perp.errors import ConfigError
from perp.io.atomic import atomic_directory, check_output_directory, require_free_space, write_json_atomic
from perp.layout import PRUNE_REPORT, RECOVER_REPORT
from perp.models.construction import one_model_at_a_time
from perp.prune.engine import (EngineOptions, EngineResult, LayerReconstruction, default_batch_size,
                               prune_model)
from perp.prune.masks import MASKS_FILE, save_masks
from perp.prune.methods import PruneMethod, create_method
from perp.prune.patterns import PruneSpec
from perp.prune.selection import check_calibration, plan_pruning, planned_counts
from perp.prune.stats import native_bf16

REPORT_FILE = PRUNE_REPORT
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resolve_compute_dtype(value: Optional[str | torch.dtype], device: Optional[torch.device] = None,
                          weights_dtype: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """`auto`/None: the weights' dtype; `fast`: bfloat16 for fp32 weights where the hardware computes bf16
    natively (`device` a GPU, or a CPU with AVX512-BF16/AMX), else the weights' dtype; else float32, bfloat16 or
    float16 (lower precision than the weights runs under autocast)."""
    if value is None or value == "auto":
        return None
    if value == "fast":
        if device is None or weights_dtype not in (None, torch.float32):
            return None
        return torch.bfloat16 if native_bf16(torch.device(device)) else None
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ConfigError(f"prune.compute_dtype: unknown dtype '{value}' (allowed: auto, fast, {', '.join(_DTYPES)})")
    return _DTYPES[value]


def check_compute_dtype(config: PerpConfig) -> None:
    """Autocast only lowers precision, and not from one half type to the other: refuse what it would not do."""
    from perp.models.loading import resolve_device_dtype

    device, weights = resolve_device_dtype(config.model.device, config.model.dtype)
    compute = resolve_compute_dtype(config.prune.compute_dtype, device, weights)
    if compute is None or compute == weights:
        return
    name = {dtype: label for label, dtype in _DTYPES.items()}
    asked = f"prune.compute_dtype={name[compute]} with {name[weights]} weights (model.dtype={config.model.dtype})"
    if compute.itemsize > weights.itemsize:
        raise ConfigError(f"{asked}: autocast only lowers precision, so the forwards would run in {name[weights]}; "
                          f"load float32 weights (model.dtype=float32) or set prune.compute_dtype=auto")
    if weights.itemsize == compute.itemsize:
        raise ConfigError(f"{asked}: autocast from one half type to the other fails in the norms; use "
                          f"prune.compute_dtype=auto, or load float32 weights (model.dtype=float32)")


def with_engine_overrides(config: PerpConfig, **overrides: Any) -> PerpConfig:
    """`config` with the given `prune.*` engine settings replaced (None = keep the config's), validated."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if "compute_dtype" in given and isinstance(given["compute_dtype"], torch.dtype):
        given["compute_dtype"] = str(given["compute_dtype"]).removeprefix("torch.")
    if not given:
        return config
    prune = validate_section(PruneConfig, {**config.prune.model_dump(mode="json"), **given}, prefix="prune")
    return config.model_copy(update={"prune": prune})


def run_prune(config: PerpConfig, out_dir: str | Path, calib: Optional[TokenSet] = None,
              progress: Optional[Callable[..., None]] = None, *,
              compute_dtype: Optional[str | torch.dtype] = None,
              batch_size: Optional[int] = None, error_tokens: Optional[int] = None,
              sequential: Optional[str] = None, reconstruction: Optional["FusedStep"] = None) -> dict[str, Any]:
    """Prune `config.model.name` with `config.prune`, calibrated on `calib` (default: `config.data.calibration`).

    Every check (architecture, Linear selection, pattern vs. shapes, calibration text and vocabulary) runs
    before the first layer is processed; failures are `PerpError`s with one-line messages. `progress` is called
    as progress(layers_done, layers_total, message). Returns the report (also written to prune_report.json).

    The engine settings come from `prune.compute_dtype`, `prune.batch_size`, `prune.error_tokens` and
    `prune.sequential`: the calibration forward precision (`auto` = the weights'), windows per micro-batch (None:
    automatic), the number of calibration tokens that estimate the reconstruction error of Hessian-free methods,
    and the engine mode (`layer`: reference, two passes per layer; `linear`: true-sequential, one pass, whole
    calibration set at once; `auto`: `linear` when that fits in 2 GiB — see `EngineOptions`). The keyword options
    of the same names, when given (not None), override the config's; the report's `config` records the values
    used.

    `reconstruction` (`perp.recover.fused`) retrains each layer right after it is pruned; its report and files
    are written into the same output directory.
    """
    from perp.models import load_model

    started = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = check_output_directory(out_dir, inputs=[config.model.name], kind=output_kind_for(reconstruction))
    config = with_engine_overrides(config, compute_dtype=compute_dtype, batch_size=batch_size,
                                   error_tokens=error_tokens, sequential=sequential)
    spec = PruneSpec.from_config(config.prune)
    method = _create_method(config, spec)
    resolve_compute_dtype(config.prune.compute_dtype)  # an unknown name fails here, before anything loads
    if reconstruction is None:  # fused runs compute in the training's precision instead
        check_compute_dtype(config)

    t0 = time.perf_counter()
    skeleton, family, calib, planned = _preflight(config, spec, calib)
    _require_space(config, out_dir, planned, skeleton, family, reconstruction)
    timings["prepare"] = time.perf_counter() - t0  # validation on a meta model, calibration windows

    t0 = time.perf_counter()
    loaded = load_model(config.model.name, config.model.device, config.model.dtype, config.model.revision,
                        load_to_device=False)
    timings["load"] = time.perf_counter() - t0
    model = loaded.model
    plans = plan_pruning(model, family, config.prune.include, config.prune.exclude, spec)
    options = _engine_options(config, loaded, calib, method, reconstruction)
    if reconstruction is not None:
        reconstruction.prepare(loaded, calib, sum(1 for plan in plans if plan.groups))
    result = prune_model(model, family, method, plans, calib.ids, options, progress)
    timings.update(result.timings)
    if result.layer_sparsity:  # OWL chose the layer sparsities: the exact plan follows from them
        layer_plans = [replace(plan, sparsity=result.layer_sparsity.get(plan.index)) for plan in plans]
        planned = planned_counts(model, family, layer_plans, spec)

    report = build_report(config, loaded, calib, spec, result, options, planned)
    if reconstruction is not None:
        recovered = reconstruction.finish(result.peak_device_bytes or _peak_rss_bytes(),
                                          loaded.family.decoder_sparsity(model))
        report["reconstruction"] = {key: recovered.get(key) for key in (
            "method", "trainable_params", "ppl_before", "ppl_after", "seconds")} | {"report": RECOVER_REPORT}
    _write_outputs(out_dir, loaded, result, report, reconstruction, timings, started)
    return report


def _create_method(config: PerpConfig, spec: PruneSpec) -> PruneMethod:
    """The configured method; an N:M pattern overriding `prune.sparsity` is a warning and a note in the report."""
    method = create_method(config.prune.method, spec)
    if spec.nm is not None and abs(config.prune.sparsity - spec.target_sparsity) > 1e-9:
        message = (f"prune.sparsity {config.prune.sparsity:g} is ignored: the {spec.pattern} pattern prunes exactly "
                   f"{spec.target_sparsity:g}")
        warnings.warn(message, stacklevel=3)
        method.notes.append(message)
    return method


def _preflight(config: PerpConfig, spec: PruneSpec,
               calib: Optional[TokenSet]) -> tuple[torch.nn.Module, Any, TokenSet, tuple[int, int]]:
    """Everything that can be wrong, checked on a weightless (meta) copy of the model before the weights load:
    the architecture, the Linear selection, the pattern against the shapes (also at the lowest sparsity OWL may
    choose), the calibration windows against the vocabulary. Returns (skeleton, family, calibration, planned
    counts)."""
    from perp.data import calibration_set

    skeleton, family, tokenizer = model_skeleton(config.model.name, config.model.revision)
    planned = planned_counts(skeleton, family,
                             plan_pruning(skeleton, family, config.prune.include, config.prune.exclude, spec), spec)
    if config.prune.owl_lambda > 0:  # the least sparse layer OWL may choose must still prune in every Linear
        lowest = replace(spec, sparsity=spec.sparsity - 2 * config.prune.owl_lambda)
        try:
            plan_pruning(skeleton, family, config.prune.include, config.prune.exclude, lowest)
        except ConfigError as error:
            raise ConfigError(f"prune.owl_lambda: OWL may lower a layer's sparsity to {lowest.sparsity:.3g}, "
                              f"where {error}; lower owl_lambda") from None
    if calib is None:
        calib = calibration_set(config.data.calibration, tokenizer)
    check_calibration(calib.ids, skeleton, family)
    return skeleton, family, calib, planned


def _require_space(config: PerpConfig, out_dir: Path, planned: tuple[int, int], skeleton: torch.nn.Module,
                   family: Any, reconstruction: Optional["FusedStep"]) -> None:
    """The pruned checkpoint (every tensor, zeros included), its bitmasks and a fused recovery's adapter must fit
    where they will be written."""
    from perp.models.loading import resolve_device_dtype, saved_copy_bytes

    mc = config.model
    needed = saved_copy_bytes(mc.name, mc.revision, mc.device, mc.dtype) + planned[1] // 8
    content = "the pruned checkpoint with its masks"
    if reconstruction is not None:
        needed += reconstruction.output_bytes(skeleton, family, resolve_device_dtype(mc.device, mc.dtype)[1].itemsize)
        content = "the recovered checkpoint with its masks and adapter"
    require_free_space(out_dir, needed, "--out", content)


def _engine_options(config: PerpConfig, loaded: Any, calib: TokenSet, method: PruneMethod,
                    reconstruction: Optional["FusedStep"]) -> EngineOptions:
    compute = resolve_compute_dtype(config.prune.compute_dtype, loaded.device, loaded.dtype)
    if reconstruction is not None:
        compute = reconstruction.compute_dtype(loaded.device, loaded.dtype)
        method.notes.append("fused with layer-wise recovery: calibration forwards run in the training's precision "
                            f"({str(compute or loaded.dtype).removeprefix('torch.')}), not prune.compute_dtype")
    return EngineOptions(
        device=loaded.device,
        compute_dtype=compute,
        batch_size=config.prune.batch_size or default_batch_size(calib.seqlen, loaded.device),
        error_tokens=config.prune.error_tokens,
        sequential=config.prune.sequential,
        owl_lambda=config.prune.owl_lambda,
        owl_m=config.prune.owl_m,
        reconstruct=reconstruction,
    )


def _write_outputs(out_dir: Path, loaded: Any, result: EngineResult, report: dict[str, Any],
                   reconstruction: Optional["FusedStep"], timings: dict[str, float], started: float) -> None:
    """The checkpoint, tokenizer, masks, the fused recovery's files and the report, staged and renamed into place
    together (nothing half-written on failure); the report's timings include the save."""
    t0 = time.perf_counter()
    with atomic_directory(out_dir, kind=output_kind_for(reconstruction)) as staging:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        save_masks(result.masks, staging / MASKS_FILE)
        if reconstruction is not None:
            reconstruction.write(staging)
        timings["save"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        report["timings"] = {key: round(value, 4) for key, value in timings.items()}
        report["peak_memory_bytes"] = result.peak_device_bytes or _peak_rss_bytes()
        report["peak_rss_bytes"] = _peak_rss_bytes()
        write_json_atomic(staging / REPORT_FILE, report)


def output_kind_for(reconstruction: Optional["FusedStep"]) -> str:
    """A fused run's output is a recovered model; a plain run's a pruned one (what the completion marker says)."""
    return "recover" if reconstruction is not None else "prune"


class FusedStep(LayerReconstruction, Protocol):
    """A per-layer reconstruction and what `run_prune` calls around the engine (`perp.recover.fused`)."""

    def prepare(self, loaded: Any, calib: TokenSet, blocks: int) -> None: ...

    def compute_dtype(self, device: torch.device, model_dtype: torch.dtype) -> Optional[torch.dtype]: ...

    def finish(self, peak_memory_bytes: int, sparsity: dict[str, Any]) -> dict[str, Any]: ...

    def write(self, staging: Path) -> None: ...

    def output_bytes(self, skeleton: torch.nn.Module, family: Any, itemsize: int) -> int: ...


def model_skeleton(spec: str, revision: Optional[str] = None) -> tuple[torch.nn.Module, Any, Any]:
    """(model on the meta device, family adapter, tokenizer) without reading a weight; fetches remote sources."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perp.errors import ModelSourceError
    from perp.models.loading import peek_family, resolve_model_dir, tokenizer_from

    _, path = resolve_model_dir(spec, revision)
    family = peek_family(path)
    try:
        model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load model from '{path}': {str(error).splitlines()[0]}") from None
    tokenizer = tokenizer_from(path)
    with one_model_at_a_time(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return skeleton, family, tokenizer


def build_report(config: PerpConfig, loaded: Any, calib: TokenSet, spec: PruneSpec, result: EngineResult,
                 options: EngineOptions, planned: tuple[int, int]) -> dict[str, Any]:
    """The report; `planned` is (weights the plan prunes, weights of the planned Linears) from `planned_counts`."""
    from perp import __version__

    pruned = sum(entry["pruned"] for entry in result.linears.values())
    total = sum(entry["shape"][0] * entry["shape"][1] for entry in result.linears.values())
    decoder = loaded.family.decoder_sparsity(loaded.model)
    errors = [entry["rel_error"] for entry in result.linears.values() if entry["rel_error"] == entry["rel_error"]]
    how = sorted({entry["error"] for entry in result.linears.values()})
    return {
        "method": config.prune.method,
        "pattern": spec.pattern,
        "granularity": spec.granularity,
        "target_sparsity": spec.target_sparsity,
        # exact: the per-row / per-matrix / N:M counts of the plan, over the weights of the planned Linears
        "planned_sparsity": planned[0] / planned[1] if planned[1] else 0.0,
        "planned_pruned_weights": planned[0],
        "achieved_sparsity": pruned / total if total else 0.0,
        "pruned_weights": pruned,
        "selected_weights": total,
        "decoder_sparsity": decoder["sparsity"],
        "mean_rel_error": sum(errors) / len(errors) if errors else None,
        "owl": ({"lambda": options.owl_lambda, "m": options.owl_m,
                 "layer_sparsity": {str(k): v for k, v in sorted(result.layer_sparsity.items())},
                 "outlier_ratios": {str(k): v for k, v in sorted(result.outlier_ratios.items())}}
                if result.layer_sparsity else None),
        "layers": {name: {"sparsity": entry["sparsity"], "rel_error": entry["rel_error"], "shape": entry["shape"]}
                   for name, entry in result.linears.items()},
        "rel_error_estimate": {
            "how": how,
            "definition": "‖WX − ŴX‖² / ‖WX‖² over the Linear's calibration inputs X " + (
                "as the one-pass forward reached it (earlier layers and the earlier Linear groups of its own layer "
                "already pruned)" if result.sequential == "linear" else
                "in the dense layer (earlier layers already pruned)"),
            "exact": "from the Hessian XᵀX over every calibration token",
            "sampled": f"on {min(options.error_tokens, result.tokens)} of {result.tokens} calibration tokens "
                       f"(seeded random subset)",
        },
        "engine": {
            "device": str(torch.device(options.device)),
            "weights_dtype": str(loaded.dtype).removeprefix("torch."),
            "compute_dtype": str(options.compute_dtype or loaded.dtype).removeprefix("torch."),
            "batch_size": calib.ids.shape[0] if result.sequential == "linear" else options.batch_size,  # as ran
            "sequential": result.sequential,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "notes": result.notes,
        "config": dump_params(config),
        "calibration": calib.describe(),
        "base_model": {"source": recorded_model_source(loaded.source), "kind": loaded.kind,
                       "sha256": loaded.content_hash, "family": loaded.family.name},
        "perp_version": __version__,
        "masks": {"file": MASKS_FILE, "format": "bitmask, True = kept", "linears": len(result.masks)},
    }
