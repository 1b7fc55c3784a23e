"""End to end on the embedded SmolLM2 and the shared WikiText-2 test file (the slow tests)."""

import json

import pytest

pytestmark = pytest.mark.e2e

REFERENCE_PPL = 23.94  # an independent implementation of the same protocol (seqlen 1024, first 32 windows)


def test_smollm2_info_is_measured(cli):
    result = cli("info", "--model", "smollm2-135m", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and info["layers"] == 30 and info["hidden_size"] == 576
    assert info["tied_embeddings"] is True
    assert 134_000_000 < info["parameters"] < 135_000_000
    assert info["decoder_sparsity"] < 0.01


def test_smollm2_wikitext2_perplexity_agrees_with_reference(cli, shared_data):
    result = cli("eval", "ppl", "--model", "smollm2-135m", "--data", str(shared_data / "wikitext2" / "wiki.test.raw"),
                 "--seqlen", "1024", "--windows", "32", "--json")
    assert result.returncode == 0, result.stderr
    ppl = json.loads(result.stdout)
    assert ppl["windows"] == 32 and ppl["seqlen"] == 1024
    assert abs(ppl["ppl"] - REFERENCE_PPL) / REFERENCE_PPL < 0.005, ppl


def test_gguf_file_source_rebuilds_a_saveable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from perp.models import load_model
    from perp.models.loading import embedded_gguf_path

    loaded = load_model(str(embedded_gguf_path()))
    assert loaded.kind == "gguf"
    assert getattr(loaded.model.config, "quantization_config", None) is None
    loaded.model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.num_hidden_layers == 30


def test_gguf_conversion_that_cannot_fit_is_refused_before_dequantizing(tmp_path, monkeypatch, full_disk):
    """A fresh cache on a small disk: the 513 MiB fp32 checkpoint is refused up front, and a killed conversion's
    hour-old staging is reclaimed first (a young one may be a live conversion: kept)."""
    import os
    import time

    from perp.errors import OutputError
    from perp.io.hashing import cached_sha256
    from perp.models import load_model
    from perp.models.loading import embedded_gguf_path

    cache = full_disk(tmp_path / "cache", free=200 << 20)
    monkeypatch.setenv("PERP_CACHE", str(cache))
    gguf = embedded_gguf_path()
    converted = f"{gguf.stem}-{cached_sha256(gguf)[:16]}"  # the cache entry the conversion stages beside
    models = cache / "models"
    models.mkdir()
    old, young = models / f".{converted}.dead0001", models / f".{converted}.live0002"
    for staging in (old, young):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"0" * 1024)
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    with pytest.raises(OutputError, match=r"dequantizing 'SmolLM2-135M-Instruct.Q4_1.gguf' to fp32 needs about "
                                          r"5\d\d.\d MiB, but .* has 200.0 MiB free; .* PERP_CACHE"):
        load_model(str(gguf))
    assert sorted(path.name for path in models.iterdir()) == [young.name]
