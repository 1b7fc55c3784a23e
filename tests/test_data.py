import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from perp.config import TextSourceConfig
from perp.data import calibration_set, calibration_windows, evaluation_windows, read_documents, token_hash
from perp.errors import DataSourceError
from perp.models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _reference_sampler(documents, tokenizer, nsamples, seqlen, seed):
    """The SparseGPT/Wanda C4 loader's sampling loop, written out as published (global RNG)."""
    random.seed(seed)
    samples = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            enc = tokenizer(documents[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        samples.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(samples, dim=0)


def test_calibration_matches_reference_sampler(tokenizer):
    rng = random.Random(1)
    documents = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(10, 400))) for _ in range(50)]
    ours = calibration_windows(documents, tokenizer, nsamples=16, seqlen=64, seed=7)
    assert torch.equal(ours.ids, _reference_sampler(documents, tokenizer, 16, 64, 7))
    assert ours.meta["sampler"] == "documents"
    again = calibration_windows(documents, tokenizer, nsamples=16, seqlen=64, seed=7)
    assert ours.hash == again.hash
    assert calibration_windows(documents, tokenizer, nsamples=16, seqlen=64, seed=8).hash != ours.hash


def test_short_documents_fall_back_to_joined_sampling(tokenizer):
    documents = ["short line number %d" % i for i in range(100)]
    windows = calibration_windows(documents, tokenizer, nsamples=4, seqlen=32, seed=0)
    assert windows.ids.shape == (4, 32) and windows.meta["sampler"] == "joined"


def test_text_shorter_than_one_window_is_an_error(tokenizer):
    with pytest.raises(DataSourceError, match="shorter than one window of 512"):
        calibration_windows(["tiny text"], tokenizer, nsamples=2, seqlen=512, seed=0, source="x.txt")
    with pytest.raises(DataSourceError, match="shorter than one window of 512"):
        evaluation_windows(["tiny text"], tokenizer, seqlen=512)


def test_evaluation_windows_are_non_overlapping_and_joined(tokenizer):
    documents = ["alpha " * 30, "beta " * 30]
    windows = evaluation_windows(documents, tokenizer, seqlen=16)
    full = tokenizer("\n\n".join(documents))["input_ids"]
    assert windows.ids.shape == (len(full) // 16, 16)
    assert windows.ids.flatten().tolist() == full[: windows.num_tokens]
    assert evaluation_windows(documents, tokenizer, seqlen=16, max_windows=3).num_windows == 3


def test_token_hash_depends_on_content_and_shape():
    ids = torch.arange(12).view(3, 4)
    assert token_hash(ids) == token_hash(ids.clone())
    assert token_hash(ids) != token_hash(ids.view(4, 3))
    assert token_hash(ids) != token_hash(ids + 1)


def test_file_sources(tmp_path, tokenizer):
    text = tmp_path / "corpus.txt"
    text.write_text("line one\n\nline two\n")
    assert read_documents(str(text)) == ["line one\n\nline two\n"]

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"document {i} " * 40}) for i in range(5)))
    assert len(read_documents(str(jsonl), text_field="body")) == 5
    with pytest.raises(DataSourceError, match="line 1 has no field 'text'"):
        read_documents(str(jsonl))

    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": ["p " * 50, "q " * 50]}), parquet)
    assert read_documents(str(parquet), text_field="content")[1].startswith("q ")
    with pytest.raises(DataSourceError, match="no column 'text'"):
        read_documents(str(parquet))

    config = TextSourceConfig(source=str(jsonl), text_field="body", nsamples=3, seqlen=32, seed=0)
    assert calibration_set(config, tokenizer).ids.shape == (3, 32)


def test_s3_text_source(s3_bucket, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("PERP_CACHE", str(tmp_path / "cache"))
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="data/c4.jsonl", Body=b'{"text": "from s3"}\n')
    assert read_documents(f"s3://{s3_bucket}/data/c4.jsonl") == ["from s3"]


def test_embedded_corpus_is_real_disjoint_wikipedia():
    calib = read_documents("embedded:wiki-calib")
    evaluation = read_documents("embedded:wiki-eval")
    assert len(calib) > 50 and len(evaluation) > 10
    assert not set(calib) & set(evaluation)
    joined = "\n".join(evaluation)
    assert "[[" not in joined and "'''" not in joined
    assert sum(len(doc) for doc in evaluation) > 200_000


def test_hf_source_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    offline = "hf:some/dataset-not-cached:default:test: cannot load the dataset \\(the Hugging Face Hub is offline"
    with pytest.raises(DataSourceError, match=offline):
        read_documents("hf:some/dataset-not-cached:default:test")


def test_non_utf8_text_is_a_clear_error_naming_file_and_line(tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataSourceError, match=r"bin\.txt: not UTF-8 text \(byte 0xff at offset 0, line 1\); "
                                              r"convert it from UTF-16 \(it starts with a UTF-16 byte order mark\)"):
        read_documents(str(binary))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\nna\u00efve".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin\.txt: not UTF-8 text \(byte 0xe9 at offset 3, line 1\)"):
        read_documents(str(latin))

    jsonl = tmp_path / "bin.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataSourceError, match=r"bin\.jsonl: line 3 is not UTF-8 \(byte 0xe9 at column 14\)"):
        read_documents(str(jsonl))
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes('\ufeff{"text": "a\u00e9"}\r\n\r\n{"text": "b"}\r\n'.encode())  # BOM, CRLF, blank line
    assert read_documents(str(crlf)) == ["a\u00e9", "b"]


@pytest.mark.parametrize("value, problem", [
    (None, "line 2 has a null 'text'"),
    (5, "line 2 has a 'text' of type number, not a string"),
    (["a"], "line 2 has a 'text' of type array, not a string"),
    ({"a": 1}, "line 2 has a 'text' of type object, not a string"),
    (True, "line 2 has a 'text' of type boolean, not a string"),
])
def test_jsonl_text_that_is_not_a_string_is_an_error_not_its_repr(tmp_path, value, problem):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"text": "ok " * 20}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(DataSourceError, match=f"corpus.jsonl: {problem}"):
        read_documents(str(jsonl))


def test_jsonl_lone_surrogate_and_empty_text(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "\\ud800"}\n')
    with pytest.raises(DataSourceError, match="line 1 has a 'text' that is not valid Unicode"):
        read_documents(str(jsonl))
    jsonl.write_text('{"text": ""}\n{"text": "x"}\n')
    assert read_documents(str(jsonl)) == ["", "x"]  # empty text is text: kept as before


def test_parquet_nulls_non_strings_and_garbage_are_clear_errors(tmp_path):
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    with pytest.raises(DataSourceError, match="nulls.parquet: record 2 has a null 'text'"):
        read_documents(str(nulls))
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(DataSourceError, match="numbers.parquet: record 1 has a 'text' of type number, not a string"):
        read_documents(str(numbers))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\xff\xfe not parquet at all")
    with pytest.raises(DataSourceError, match="garbage.parquet: cannot read it as Parquet"):
        read_documents(str(garbage))


def test_cli_reports_non_utf8_data_in_one_line(tmp_path):
    import subprocess
    import sys

    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    result = subprocess.run([sys.executable, "-m", "perp", "prune", "--model", "tiny-llama", "--calib", str(binary),
                             "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "pruned")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "bin.jsonl: line 1 is not UTF-8 (byte 0xff at column 1)" in " ".join(result.stderr.split())
    assert not (tmp_path / "pruned").exists()


def test_hf_source_with_data_files_reads_only_those_files(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config=None, split=None, data_files=None):
        calls.append((name, config, split, data_files))
        return datasets.Dataset.from_dict({"text": ["first document", "second document"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    shard = "en/c4-train.00000-of-01024.json.gz"
    assert read_documents(f"hf:allenai/c4::train:{shard}") == ["first document", "second document"]
    read_documents("hf:wikitext:wikitext-2-raw-v1:test")
    assert calls == [("allenai/c4", None, "train", {"train": shard}),
                     ("wikitext", "wikitext-2-raw-v1", "test", None)]


@pytest.mark.parametrize("spec", ["hf:", "hf:a:b:c:d:e"])
def test_malformed_hf_spec_is_a_config_error(spec):
    from perp.config import classify_text_source
    from perp.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a Hugging Face dataset spec"):
        classify_text_source(spec)
