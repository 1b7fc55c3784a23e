"""`perp prune`: the mask stage — prune every selected decoder Linear, layer by layer."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import typer

from perp.errors import PerpError
from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, emit, progress_bar


class _LayerProgress:
    """Adapts `run_prune`'s progress(done, total, message) calls to a rich bar opened on the first call."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._stack = contextlib.ExitStack()
        self._advance: Any = None
        self._done = 0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        if self._advance is None:
            self._advance = self._stack.enter_context(progress_bar("pruning layers", total))
        self._advance(done - self._done, message)
        self._done = done

    def __enter__(self) -> "_LayerProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def summary(report: dict[str, Any], out: Path) -> dict[str, Any]:
    return {
        "out": str(out),
        "method": report["method"],
        "pattern": report["pattern"],
        "granularity": report["granularity"],
        "target_sparsity": report["target_sparsity"],
        "achieved_sparsity": report["achieved_sparsity"],
        "decoder_sparsity": report["decoder_sparsity"],
        "linears": len(report["layers"]),
        "mean_rel_error": report["mean_rel_error"],
        "calibration_sha256": report["calibration"]["sha256"],
        "calibration_tokens": report["calibration"]["tokens"],
        "seconds": report["timings"].get("total"),
        "peak_memory_bytes": report["peak_memory_bytes"],
    }


@app.command()
def prune(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Dense model to prune."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text."),
    calib_set: Optional[Path] = typer.Option(None, "--calib-set", help="Stored calibration windows from "
                                             "`perp calibrate` (instead of sampling --calib)."),
    method: Optional[str] = typer.Option(None, "--method", help="magnitude, wanda or sparsegpt."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction of weights to prune, in [0, 1)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="unstructured, 2:4, 4:8 or any N:M."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Calibration window length."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Calibration sampling seed."),
    granularity: Optional[str] = typer.Option(None, "--granularity", help="row (Wanda reference) or matrix (PERP)."),
    compute_dtype: Optional[str] = typer.Option(
        None, "--compute-dtype", help="Precision of the calibration forwards: auto (the weights'), fast (bf16 where "
        "the hardware has it natively, else the weights'), float32, bfloat16, float16 (overrides "
        "prune.compute_dtype)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size",
        help="Calibration windows per micro-batch (overrides prune.batch_size; default automatic)."),
    error_tokens: Optional[int] = typer.Option(
        None, "--error-tokens", help="Calibration tokens that estimate the reconstruction error (overrides "
        "prune.error_tokens; 0: none)."),
    sequential: Optional[str] = typer.Option(
        None, "--sequential", help="layer (reference: two passes per layer), linear (true-sequential, one pass) or "
        "auto (linear when one layer's activations over all calibration tokens fit in 2 GiB); "
        "overrides prune.sequential."),
    owl_lambda: Optional[float] = typer.Option(
        None, "--owl-lambda", help="OWL: per-layer sparsity within sparsity ± 2λ from each layer's outlier share "
        "(overrides prune.owl_lambda; 0: uniform)."),
    owl_m: Optional[float] = typer.Option(
        None, "--owl-m", help="OWL: a score is an outlier above M × its layer's mean (overrides prune.owl_m)."),
    out: Path = typer.Option(Path("out/pruned"), "--out", help="Output directory."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Prune every decoder Linear layer by layer (magnitude, Wanda, SparseGPT; unstructured or N:M).

    Writes a Hugging Face checkpoint with zeros in place, masks.safetensors (bitmasks) and prune_report.json.
    """
    config = build_config(params, sets, **{
        "model.name": model, "data.calibration.source": calib, "prune.method": method, "prune.sparsity": sparsity,
        "prune.pattern": pattern, "data.calibration.nsamples": nsamples, "data.calibration.seqlen": seqlen,
        "data.calibration.seed": seed, "prune.granularity": granularity, "prune.compute_dtype": compute_dtype,
        "prune.batch_size": batch_size, "prune.error_tokens": error_tokens, "prune.sequential": sequential,
        "prune.owl_lambda": owl_lambda, "prune.owl_m": owl_m,
    })
    from perp.prune import run_prune

    token_set = None
    if calib_set is not None:
        if any(value is not None for value in (calib, nsamples, seqlen, seed)):
            raise PerpError("perp prune: --calib-set already fixes the windows; drop --calib, --nsamples, --seqlen "
                            "and --seed")
        from perp.data.calibrate import load_token_set
        from perp.io.atomic import check_output_directory

        check_output_directory(out, inputs=[calib_set], kind="prune")
        token_set = load_token_set(calib_set)
    with _LayerProgress(enabled=not as_json) as progress:
        report = run_prune(config, out, calib=token_set, progress=progress)
    if as_json:
        emit({**summary(report, out), "report": report}, as_json=True)
    else:
        emit(summary(report, out), as_json=False, title="perp prune")
