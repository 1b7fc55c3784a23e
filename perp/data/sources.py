"""Read documents (a list of strings) from a text spec.

Specs: a local `.txt`/`.raw` file (one document), a JSONL or Parquet file with a text column,
`s3://bucket/key.{txt,jsonl,parquet}`, `hf:DATASET[:CONFIG[:SPLIT[:DATA_FILES]]]` (online only) or
`embedded:wiki-calib` / `embedded:wiki-eval`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perp.config import classify_text_source
from perp.errors import DataSourceError
from perp.io.hub import offline_when_unreachable


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
    return _text_records(path, spec)


def _text_records(path: Path, spec: str) -> list[str]:
    """A plain text file is one document, read as is (WikiText-2's raw files are already joined articles)."""
    data = _read_bytes(path, spec)
    try:
        return [data.decode("utf-8")]
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        source = " from UTF-16 (it starts with a UTF-16 byte order mark)" if utf16 else ""
        raise DataSourceError(f"{spec}: not UTF-8 text ({_bad_bytes(error)} at offset {error.start}, line {line}); "
                              f"convert it{source} to UTF-8") from None


def _jsonl_documents(path: Path, text_field: str, spec: str) -> list[str]:
    documents = []
    for number, raw in enumerate(_binary_lines(path, spec), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataSourceError(f"{spec}: line {number} is not UTF-8 ({_bad_bytes(error)} at column "
                                  f"{error.start + 1}); convert the file to UTF-8") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark (some Windows editors write one)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataSourceError(f"{spec}: line {number} is not valid JSON") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataSourceError(f"{spec}: line {number} has no field '{text_field}' (set text_field)")
        documents.append(_text_value(record[text_field], spec, f"line {number}", text_field))
    return documents


def _parquet_documents(path: Path, text_field: str, spec: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataSourceError(f"{spec}: cannot read it as Parquet ({str(error).splitlines()[0]})") from None
    if text_field not in table.column_names:
        raise DataSourceError(f"{spec}: no column '{text_field}' (columns: {', '.join(table.column_names)})")
    return _text_column(table.column(text_field).to_pylist(), spec, text_field)


def _text_column(values: list[Any], spec: str, text_field: str) -> list[str]:
    """Each value of a table's text column, checked to be text; `record N` counts rows from 1."""
    return [_text_value(value, spec, f"record {number}", text_field) for number, value in enumerate(values, 1)]


def _text_value(value: Any, spec: str, where: str, text_field: str) -> str:
    """A record's text, which must be a string of valid Unicode: never 'None' or '5' trained on as text."""
    if value is None:
        raise DataSourceError(f"{spec}: {where} has a null '{text_field}' (remove the record or give it text)")
    if not isinstance(value, str):
        raise DataSourceError(f"{spec}: {where} has a '{text_field}' of type {_json_type(value)}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataSourceError(f"{spec}: {where} has a '{text_field}' that is not valid Unicode "
                              "(an unpaired surrogate escape such as \\ud800)") from None
    return value


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object", bytes: "bytes"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def _binary_lines(path: Path, spec: str) -> Iterator[bytes]:
    """The file's lines as bytes, streamed (decoded one by one, so an encoding error names its line)."""
    try:
        with open(path, "rb") as handle:
            yield from handle
    except OSError as error:
        raise DataSourceError(f"{spec}: cannot be read ({error.strerror or type(error).__name__})") from None


def _read_bytes(path: Path, spec: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataSourceError(f"{spec}: cannot be read ({error.strerror or type(error).__name__})") from None


def _bad_bytes(error: UnicodeDecodeError) -> str:
    return f"byte 0x{error.object[error.start]:02x}"


def _hf_documents(spec: str, text_field: str) -> list[str]:
    # hf:DATASET[:CONFIG[:SPLIT[:DATA_FILES]]]; DATA_FILES (a file or glob in the dataset's repository) reads
    # only those files, as the Wanda/SparseGPT references read one of C4's 1024 shards instead of all 305 GB.
    parts = spec.removeprefix("hf:").split(":") + [""] * 3
    name, config, split, files = parts[0], parts[1] or None, parts[2] or "train", parts[3] or None
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            f"{spec}: Hugging Face datasets need the 'datasets' package (pip install 'perp[hub]')") from None
    with offline_when_unreachable() as unreachable:
        try:
            dataset = datasets.load_dataset(name, config, split=split,
                                            data_files={split: files} if files else None)
        except Exception as error:
            hint = f" (the Hugging Face Hub is {unreachable} and the dataset is not cached)" if unreachable else ""
            raise DataSourceError(f"{spec}: cannot load the dataset{hint}: {type(error).__name__}") from None
    if text_field not in dataset.column_names:
        raise DataSourceError(f"{spec}: no column '{text_field}' (columns: {', '.join(dataset.column_names)})")
    return _text_column(list(dataset[text_field]), spec, text_field)
