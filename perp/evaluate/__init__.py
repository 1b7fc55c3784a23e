"""Evaluation: WikiText-2-protocol perplexity (and, in its own module, zero-shot accuracy with lm-eval)."""

from perp.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
