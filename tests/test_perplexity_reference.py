"""Perplexity against values computed by hand: exact stub models, then a tiny LLaMA scored one token at a time."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from perp.data.windows import TokenSet, evaluation_windows
from perp.evaluate.perplexity import perplexity


class TableLM(torch.nn.Module):
    """A bigram model: the logits at position t are row ids[t] of a fixed table (what `model(...).logits` gives)."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    vocab = 7
    model = TableLM([[0.0] * vocab for _ in range(vocab)])
    ids = torch.tensor([[0, 3, 6, 2, 2], [1, 1, 4, 5, 0]])
    result = perplexity(model, TokenSet(ids, "stub"), batch_size=1)
    assert result.ppl == pytest.approx(7.0, rel=1e-6)  # fp32 cross-entropy per batch
    assert result.tokens == 2 * 4 and result.windows == 2 and result.seqlen == 5


def test_bigram_model_by_hand():
    # Vocabulary {0, 1, 2}. From token 0 the logits are (ln 2, 0, 0): p(0)=1/2, p(1)=p(2)=1/4.
    # From 1: (0, ln 3, 0): p(1)=3/5, p(0)=p(2)=1/5. From 2: all 0: p=1/3 each.
    ln2, ln3 = math.log(2), math.log(3)
    model = TableLM([[ln2, 0.0, 0.0], [0.0, ln3, 0.0], [0.0, 0.0, 0.0]])
    windows = torch.tensor([[0, 0, 1, 1], [2, 1, 2, 0]])
    # Transitions scored: 0→0 (1/2), 0→1 (1/4), 1→1 (3/5) | 2→1 (1/3), 1→2 (1/5), 2→0 (1/3)
    probabilities = [1 / 2, 1 / 4, 3 / 5, 1 / 3, 1 / 5, 1 / 3]
    expected_nll = -sum(math.log(p) for p in probabilities) / 6
    expected = math.exp(expected_nll)  # = (1/2 · 1/4 · 3/5 · 1/3 · 1/5 · 1/3)^(-1/6) = 600^(1/6) ≈ 2.9042
    assert expected == pytest.approx(600 ** (1 / 6), rel=1e-9)
    for batch_size in (1, 2, 5):  # batching never changes the result
        result = perplexity(model, TokenSet(windows, "stub"), batch_size=batch_size)
        assert result.ppl == pytest.approx(expected, rel=1e-6)
        assert result.nll == pytest.approx(expected_nll, rel=1e-6)
        assert result.tokens == 6


def test_tiny_llama_against_token_by_token_reference():
    """Each next-token probability from a separate forward over the prefix, log-softmax by hand in float64."""
    from perp.models.tiny import build_tiny_model, byte_tokenizer

    model = build_tiny_model("llama")
    tokenizer = byte_tokenizer()
    documents = ["Perplexity is the exponential of the mean next-token loss.", "Windows do not overlap."]
    windows = evaluation_windows(documents, tokenizer, seqlen=12, max_windows=3)
    ids = windows.ids
    assert ids.shape == (3, 12)
    # The protocol: documents joined with a blank line, tokenized once, cut into consecutive windows.
    joined = tokenizer("\n\n".join(documents))["input_ids"]
    assert ids.flatten().tolist() == joined[: 3 * 12]

    total_nll, count = 0.0, 0
    with torch.no_grad():
        for window in ids.tolist():
            for t in range(1, len(window)):
                logits = model(input_ids=torch.tensor([window[:t]])).logits[0, -1].double().tolist()
                peak = max(logits)
                log_z = peak + math.log(sum(math.exp(v - peak) for v in logits))
                total_nll += log_z - logits[window[t]]
                count += 1
    expected = math.exp(total_nll / count)
    result = perplexity(model, windows, batch_size=2)
    assert count == result.tokens == 3 * 11
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.data_hash == windows.hash
