"""`perp recover`: PERP retraining of a pruned model (end to end or layer-wise), with progress and --json."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, console, emit
from perp.errors import PerpError

_STAGES = {"load": "loading", "ppl_before": "perplexity before", "prune": "pruning layers", "train": "training",
           "merge": "merging",
           "ppl_after": "perplexity after", "save": "saving"}
_SUMMARY = ("method", "mode", "trainable_params", "trainable_fraction", "ppl_before", "ppl_after", "seconds",
            "tokens_per_second", "peak_memory_bytes", "dense_result", "tied_embeddings_action")


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress display on stderr: one bar per stage, the running loss while training."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int, status: str) -> None:
            if stage not in tasks:
                for task in tasks.values():  # a new stage: the earlier ones are finished
                    if progress.tasks[task].total is None:
                        progress.update(task, total=1, completed=1)
                if stage not in _STAGES:
                    return
                tasks[stage] = progress.add_task(_STAGES[stage], total=total or None, status="")
            progress.update(tasks[stage], completed=done, total=total or None, status=status)

        yield update


@app.command()
def recover(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Pruned model (default: model.name)."),
    dense: Optional[str] = typer.Option(None, "--dense", help="Dense reference (needed by --mode layerwise)."),
    method: Optional[str] = typer.Option(
        None, "--method", help="bias, norm, lm_head, lora, masklora, scalelora, full; join with +."),
    mode: Optional[str] = typer.Option(None, "--mode", help="end2end or layerwise."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (per block in layer-wise mode)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Training window length in tokens."),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (scale alpha/rank)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training text (default: the calibration source)."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Distinct training windows the data supplies."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for adapter init and window order."),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward."),
    fused: bool = typer.Option(False, "--fused", help="Prune --model (dense) with the prune.* settings and "
                               "reconstruct each block right after pruning it (layer-wise); writes both reports."),
    calib_set: Optional[Path] = typer.Option(None, "--calib-set", help="With --fused: stored calibration windows "
                                             "from `perp calibrate` (default: sample data.calibration)."),
    out: Path = typer.Option(Path("out/recovered"), "--out", help="Output directory (written atomically)."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Retrain a tiny subset (biases, norms, LM-head LoRA, sparsity-preserving LoRA), end to end or layer-wise."""
    values = {
        "model.name": model, "recover.method": method, "recover.mode": mode, "recover.steps": steps,
        "recover.lr": lr, "recover.batch_size": batch_size, "recover.grad_accum": grad_accum,
        "recover.seqlen": seqlen, "recover.rank": rank, "recover.alpha": alpha, "recover.seed": seed,
        "recover.gradient_checkpointing": gradient_checkpointing, "recover.data.source": data,
    }
    config = build_config(params, sets, **values)
    if nsamples is not None:
        source = config.recover.data or config.data.calibration
        config = build_config(params, sets, **{
            **values, "recover.data.source": source.source, "recover.data.text_field": source.text_field,
            "recover.data.seed": source.seed, "recover.data.nsamples": nsamples,
        })
    if fused:
        unused = [flag for flag, value in (("--data", data), ("--seqlen", seqlen), ("--nsamples", nsamples))
                  if value is not None]
        if unused:
            raise PerpError(f"perp recover: with --fused the blocks train on the calibration windows "
                            f"(data.calibration or --calib-set); drop {', '.join(unused)}")
        _run_fused(config, mode, dense, calib_set, out, as_json)
        return
    if calib_set is not None:
        raise PerpError("perp recover: --calib-set goes with --fused (training windows come from --data)")
    from perp.recover import run_recover, validate_request

    validate_request(config, config.model.name, dense)  # bad input fails before any model is loaded
    with _progress(enabled=not as_json) as progress:
        report = run_recover(config, config.model.name, out, dense=dense, progress=progress)
    if as_json:
        emit({**report, "out": str(out)}, as_json=True)
    else:
        emit({**{key: report[key] for key in _SUMMARY}, "out": str(out)}, as_json=False, title="recover")


def _run_fused(config: Any, mode: Optional[str], dense: Optional[str], calib_set: Optional[Path], out: Path,
               as_json: bool) -> None:
    from perp.io.atomic import check_output_directory
    from perp.recover.fused import check_fused_request, fused_config, run_fused
    from perp.recover.checks import validate_request

    if mode == "end2end":
        raise PerpError("perp recover: --fused is layer-wise reconstruction fused with pruning; drop --mode end2end")
    if dense is not None:
        raise PerpError("perp recover: with --fused, --model is the dense model, pruned and reconstructed in one "
                        "pass; drop --dense")
    config = fused_config(config)
    validate_request(config, config.model.name, config.model.name)
    check_fused_request(config)
    check_output_directory(out, inputs=[config.model.name] + ([calib_set] if calib_set is not None else []),
                           kind="recover")
    token_set = None
    if calib_set is not None:
        from perp.data.calibrate import load_token_set

        token_set = load_token_set(calib_set)
    with _progress(enabled=not as_json) as progress:
        result = run_fused(config, out, calib=token_set, progress=progress)
    report = result["recover"]
    if as_json:
        emit({**result, "out": str(out)}, as_json=True)
    else:
        emit({**{key: report.get(key) for key in _SUMMARY}, "achieved_sparsity": result["prune"]["achieved_sparsity"],
              "out": str(out)}, as_json=False, title="recover (fused with pruning)")
