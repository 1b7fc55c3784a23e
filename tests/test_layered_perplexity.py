"""Layer-at-a-time perplexity gives the numbers of the whole-model forward, on LLaMA and OPT shapes."""

import pytest
import torch

from perp.data.windows import TokenSet
from perp.evaluate.layered import layered_perplexity
from perp.evaluate.perplexity import perplexity
from perp.models.families import adapter_for
from perp.models.tiny import build_tiny_model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layered_equals_whole_model(family):
    model = build_tiny_model(family, seed=3).eval()
    ids = torch.randint(0, 259, (5, 32), generator=torch.Generator().manual_seed(0))
    windows = TokenSet(ids=ids, source="random")
    whole = perplexity(model, windows, batch_size=2)
    seen = []
    layered = layered_perplexity(model, adapter_for(model), windows, "cpu", batch_size=2,
                                 progress=lambda done, total: seen.append((done, total)))
    assert layered.ppl == pytest.approx(whole.ppl, rel=1e-5)
    assert layered.tokens == whole.tokens and layered.data_hash == whole.data_hash
    assert seen[-1] == (2, 2)
    assert not model.training


def test_layered_leaves_weights_where_they_were():
    model = build_tiny_model("llama", seed=1).eval()
    before = {name: (p.device, p.data_ptr() == p.data_ptr()) for name, p in model.named_parameters()}
    windows = TokenSet(ids=torch.randint(0, 259, (2, 16)), source="random")
    layered_perplexity(model, adapter_for(model), windows, "cpu")
    assert {name: p.device for name, p in model.named_parameters()} == {n: d for n, (d, _) in before.items()}
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings


def test_lm_head_scores_in_chunks_with_the_same_numbers(monkeypatch):
    import perp.evaluate.layered as layered

    model = build_tiny_model("llama", seed=2).eval()
    windows = TokenSet(ids=torch.randint(0, 259, (3, 32), generator=torch.Generator().manual_seed(1)), source="random")
    whole = layered_perplexity(model, adapter_for(model), windows, "cpu", batch_size=3)
    sizes = []
    real_forward = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: sizes.append(x.shape[0]) or real_forward(x))
    monkeypatch.setattr(layered, "HEAD_CHUNK_LOGITS", 259 * 10)  # ten tokens' logits at a time
    chunked = layered_perplexity(model, adapter_for(model), windows, "cpu", batch_size=3)
    assert max(sizes) == 10 and sum(sizes) == 3 * 32
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-6) and chunked.tokens == whole.tokens
