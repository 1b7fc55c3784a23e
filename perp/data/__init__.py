"""Token sources: documents from files, S3, the Hub or the embedded corpus, cut into hashed windows."""

from __future__ import annotations

from typing import Any

from perp.config import TextSourceConfig
from perp.data.sources import read_documents
from perp.data.windows import TokenSet, calibration_windows, evaluation_windows, token_hash


def calibration_set(config: TextSourceConfig, tokenizer: Any) -> TokenSet:
    documents = read_documents(config.source, config.text_field)
    return calibration_windows(documents, tokenizer, config.nsamples, config.seqlen, config.seed, config.source)


def evaluation_set(config: TextSourceConfig, tokenizer: Any) -> TokenSet:
    documents = read_documents(config.source, config.text_field)
    return evaluation_windows(documents, tokenizer, config.seqlen, config.max_windows, config.source)


__all__ = ["TokenSet", "calibration_set", "calibration_windows", "evaluation_set", "evaluation_windows",
           "read_documents", "token_hash"]
