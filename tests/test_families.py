"""Every supported LLaMA-style model type through prune → reload → recover, not only `llama` itself.

Qwen2 brings q/k/v biases and tied embeddings, Qwen3 per-head q/k norms, Mistral sliding-window attention: the
paths that differ from the tiny LLaMA the rest of the tests use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from perp.config import load_params
from perp.data.windows import TokenSet
from perp.models.construction import one_model_at_a_time
from perp.models.families import LLAMA
from perp.models.tiny import byte_tokenizer
from perp.prune import load_masks, run_prune
from perp.recover import run_recover

TYPES = [t for t in LLAMA.model_types if t != "llama"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=TYPES)
def dense_dir(request, tmp_path_factory) -> Path:
    model_type = request.param
    config = AutoConfig.for_model(model_type, vocab_size=259, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                  tie_word_embeddings=model_type == "qwen2", sliding_window=16)
    torch.manual_seed(0)
    with one_model_at_a_time():
        model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # random norms and biases, so that training them shows
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                param.uniform_(0.8, 1.2) if name.endswith("weight") else param.normal_(0.0, 0.1)
    directory = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def _config(model: Path, *sets: str):
    return load_params(None, [
        f"model.name={model}", "model.device=cpu", "prune.blocksize=32", "recover.steps=3", "recover.seqlen=32",
        "recover.batch_size=2", "recover.rank=4", "recover.alpha=8", "recover.lr=0.01",
        "data.calibration.source=embedded:wiki-calib", "data.calibration.nsamples=8",
        "data.evaluation.source=embedded:wiki-eval", "data.evaluation.seqlen=64", "data.evaluation.max_windows=2",
        "evaluate.batch_size=2", *sets])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_2_4_and_recover_keep_every_group_and_reload(dense_dir, tmp_path, method):
    calib = TokenSet(torch.randint(3, 259, (4, 48), generator=torch.Generator().manual_seed(0)), "test:random")
    pruned = tmp_path / "pruned"
    report = run_prune(_config(dense_dir, f"prune.method={method}", "prune.pattern=2:4"), pruned, calib=calib)
    assert report["achieved_sparsity"] == report["decoder_sparsity"] == 0.5
    assert len(report["layers"]) == 2 * 7  # q, k, v, o, gate, up, down per layer

    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    for name, kept in load_masks(pruned).items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight != 0, kept), name  # random weights: no kept weight is exactly zero
        assert (kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2).all(), name  # every group of 4 keeps 2

    has_biases = AutoConfig.from_pretrained(dense_dir).model_type == "qwen2"
    recovered = tmp_path / "recovered"
    methods = "norm+bias+masklora" if has_biases else "norm+masklora"
    rec = run_recover(_config(dense_dir, f"recover.method={methods}"), str(pruned), recovered)
    assert rec["masks_held"] is True
    after = load_file(recovered / "model.safetensors")
    before = load_file(pruned / "model.safetensors")
    for name, kept in load_masks(pruned).items():
        assert torch.equal(after[f"{name}.weight"] != 0, kept), name  # the merge keeps the sparsity exactly
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name  # and changed the weights
    norms = [name for name in before if name.endswith("norm.weight")]
    assert norms and all(not torch.equal(after[name], before[name]) for name in norms)
    biases = [name for name in before if name.endswith(".bias")]
    assert bool(biases) == has_biases
    assert all(not torch.equal(after[name], before[name]) for name in biases)  # Qwen2's q/k/v biases train
