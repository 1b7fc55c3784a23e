"""Read documents (a list of strings) from a text spec.

Specs: a local `.txt`/`.raw` file (one document), a JSONL or
Parquet file with a text column, `s3://bucket/key.{txt,jsonl,parquet}`, `hf:DATASET[:CONFIG[:SPLIT]]` (online
only) or `embedded:wiki-calib` / `embedded:wiki-eval`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from perp.config import classify_text_source
from perp.errors import DataSourceError


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    kind = classify_text_source(spec)
    if kind == "embedded":
        from perp.data.embedded import embedded_documents

        return embedded_documents(spec.removeprefix("embedded:"))
    if kind == "hf":
        return _hf_documents(spec, text_field)
    path = Path(spec).expanduser()
    if spec.startswith("s3://"):
        from perp.io.s3 import fetch_s3

        path = fetch_s3(spec)
    if kind == "jsonl":
        return _jsonl_documents(path, text_field, spec)
    if kind == "parquet":
        return _parquet_documents(path, text_field, spec)
    return _text_records(path)


def _text_records(path: Path) -> list[str]:
    """A plain text file is one document, read as is (WikiText-2's raw files are already joined articles)."""
    return [path.read_text(encoding="utf-8")]


def _jsonl_documents(path: Path, text_field: str, spec: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataSourceError(f"{spec}: line {number} is not valid JSON") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataSourceError(f"{spec}: line {number} has no field '{text_field}' (set text_field)")
            documents.append(str(record[text_field]))
    return documents


def _parquet_documents(path: Path, text_field: str, spec: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise DataSourceError(f"{spec}: no column '{text_field}' (columns: {', '.join(table.column_names)})")
    return [str(value) for value in table.column(text_field).to_pylist()]


def _hf_documents(spec: str, text_field: str) -> list[str]:
    parts = spec.removeprefix("hf:").split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise DataSourceError(f"{spec}: Hugging Face datasets need the 'datasets' package (pip install 'perp[hub]')") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (the Hub is offline and the dataset is not cached)" if offline else ""
        raise DataSourceError(f"{spec}: cannot load the dataset{hint}: {type(error).__name__}") from None
    if text_field not in dataset.column_names:
        raise DataSourceError(f"{spec}: no column '{text_field}' (columns: {', '.join(dataset.column_names)})")
    return [str(value) for value in dataset[text_field]]
