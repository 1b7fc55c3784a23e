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
