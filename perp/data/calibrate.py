"""The calibrate stage: sample the calibration windows once and store them with their hash.

Later stages (mask, layer-wise recovery) read the stored windows, so every stage of a run provably uses the
same tokens, and a re-run with unchanged data is recognised by its hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from perp.config import PerpConfig, dump_params
from perp.data.windows import TokenSet, token_hash
from perp.errors import DataSourceError
from perp.io.atomic import atomic_directory, check_output_directory
from perp.layout import CALIBRATION_META, CALIBRATION_TOKENS

TOKENS_FILE, META_FILE = CALIBRATION_TOKENS, CALIBRATION_META


def save_token_set(token_set: TokenSet, directory: Path) -> dict[str, Any]:
    save_file({"ids": token_set.ids.contiguous()}, str(directory / TOKENS_FILE))
    description = token_set.describe()
    (directory / META_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return description


def load_token_set(directory: str | Path) -> TokenSet:
    """Read stored windows and check them against their recorded hash."""
    directory = Path(directory)
    tokens_file, meta_file = directory / TOKENS_FILE, directory / META_FILE
    if not tokens_file.is_file() or not meta_file.is_file():
        raise DataSourceError(f"'{directory}' is not a calibration set (expected {TOKENS_FILE} and {META_FILE})")
    ids = load_file(str(tokens_file))["ids"].to(torch.long)
    meta = json.loads(meta_file.read_text())
    if token_hash(ids) != meta.get("sha256"):
        raise DataSourceError(f"calibration set '{directory}' does not match its recorded sha256 (altered?)")
    extra = {k: v for k, v in meta.items() if k not in ("source", "windows", "seqlen", "tokens", "sha256")}
    return TokenSet(ids, meta.get("source", ""), extra)


def run_calibrate(config: PerpConfig, out_dir: str | Path) -> dict[str, Any]:
    """Tokenize and sample `data.calibration` with the model's tokenizer; write the windows atomically."""
    from perp.data import calibration_set
    from perp.models import load_tokenizer

    check_output_directory(out_dir, inputs=[config.model.name, config.data.calibration.source], kind="calibration")

    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    token_set = calibration_set(config.data.calibration, tokenizer)
    with atomic_directory(out_dir, kind="calibration") as staging:
        description = save_token_set(token_set, staging)
        (staging / "params.json").write_text(json.dumps(
            {"model": dump_params(config)["model"], "calibration": dump_params(config)["data"]["calibration"]},
            indent=2, sort_keys=True) + "\n")
    return description
