"""`perp eval ppl` (and, in later issues, `perp eval zeroshot`, `perp evaluate`, `perp report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, build_config, emit, eval_app, progress_bar


@eval_app.command("ppl")
def eval_ppl(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to evaluate."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Text: file, .jsonl, .parquet, s3://, hf:..., embedded:..."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Window length in tokens (default 1024)."),
    windows: Optional[int] = typer.Option(None, "--windows", help="Use only the first N windows."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="JSONL/Parquet column holding the text."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward pass."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Perplexity, WikiText-2 protocol: text joined with blank lines, non-overlapping windows, exp(mean NLL)."""
    config = build_config(params, sets, **{
        "model.name": model, "data.evaluation.source": data, "data.evaluation.seqlen": seqlen,
        "data.evaluation.max_windows": windows, "data.evaluation.text_field": text_field,
        "evaluate.batch_size": batch_size,
    })
    from perp.data import evaluation_set
    from perp.evaluate import perplexity
    from perp.evaluate.layered import layered_perplexity
    from perp.models import load_model, load_tokenizer

    _check_seqlen_fits(config.model.name, config.model.revision, config.data.evaluation.seqlen)
    # The text is read and tokenized first: unreadable or too short data fails before the weights load.
    token_set = evaluation_set(config.data.evaluation, load_tokenizer(config.model.name, config.model.revision))
    offload = config.evaluate.offload
    loaded = load_model(config.model.name, config.model.device, config.model.dtype, config.model.revision,
                        load_to_device=not offload)
    if offload:  # one decoder layer on the device at a time: the same numbers for a model larger than the device
        layers = loaded.family.num_layers(loaded.model)
        with progress_bar("perplexity (layers)", layers, enabled=not as_json) as advance:
            result = layered_perplexity(loaded.model, loaded.family, token_set, loaded.device,
                                        config.evaluate.batch_size, progress=lambda done, total: advance(1))
    else:
        with progress_bar("perplexity", token_set.num_windows, enabled=not as_json) as advance:
            result = perplexity(loaded.model, token_set, config.evaluate.batch_size, progress=advance)
    emit({"model": config.model.name, "data": config.data.evaluation.source, "offload": offload,
          **result.as_dict()}, as_json, title="perplexity")


def _check_seqlen_fits(model: str, revision: Optional[str], seqlen: int) -> None:
    """Windows longer than the model's positions fail before the weights are read (for a local model; a remote
    one is checked by `perplexity` once fetched and loaded)."""
    from perp.config import classify_model_source
    from perp.evaluate.perplexity import check_positions, read_model_config
    from perp.models.loading import resolve_model_dir

    if classify_model_source(model) not in ("local", "alias", "gguf"):
        return
    _, path = resolve_model_dir(model, revision)
    check_positions(read_model_config(path), seqlen, "data.evaluation.seqlen (--seqlen)", f"'{model}'")
