"""Token windows: seeded calibration samples and non-overlapping evaluation windows, each with a content hash."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from perp.errors import DataSourceError


@dataclass(frozen=True)
class TokenSet:
    """A [windows, seqlen] tensor of token ids, where it came from, and a hash of its exact content."""

    ids: torch.Tensor
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return token_hash(self.ids)

    @property
    def num_windows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "windows": self.num_windows, "seqlen": self.seqlen,
                "tokens": self.num_tokens, "sha256": self.hash, **self.meta}


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the int64 ids and their shape: equal hashes mean exactly the same tokens in the same windows."""
    array = ids.detach().to("cpu", torch.int64).contiguous().numpy()
    digest = hashlib.sha256(f"{tuple(array.shape)}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


def calibration_windows(documents: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                        source: str = "") -> TokenSet:
    """`nsamples` random windows of `seqlen` tokens, with the semantics of the SparseGPT/Wanda C4 sampler.

    Per sample: draw documents uniformly until one is longer than `seqlen` tokens, then a uniform start inside
    it. The generator is a private `random.Random(seed)`, so the draws equal the reference's after
    `random.seed(seed)`. A corpus with no document long enough (a file of short lines) is sampled the way the
    reference samples WikiText: uniform starts in the documents joined by blank lines.
    """
    if not documents:
        raise DataSourceError(f"{source or 'calibration text'}: no documents")
    rng = random.Random(seed)
    max_tokens_bound = max(len(doc.encode("utf-8")) for doc in documents) + 4
    if max_tokens_bound > seqlen:
        windows = _sample_documents(documents, tokenizer, nsamples, seqlen, rng)
        if windows is not None:
            return TokenSet(torch.tensor(windows, dtype=torch.long), source,
                            {"sampler": "documents", "nsamples": nsamples, "seed": seed})
    joined = _encode(tokenizer, "\n\n".join(documents))
    if len(joined) <= seqlen:
        raise DataSourceError(
            f"{source or 'calibration text'} has {len(joined)} tokens, shorter than one window of {seqlen}; "
            "use more text or a smaller seqlen"
        )
    windows = []
    for _ in range(nsamples):
        start = rng.randint(0, len(joined) - seqlen - 1)
        windows.append(joined[start:start + seqlen])
    return TokenSet(torch.tensor(windows, dtype=torch.long), source,
                    {"sampler": "joined", "nsamples": nsamples, "seed": seed})


def _sample_documents(documents: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int,
                      rng: random.Random) -> list[list[int]] | None:
    encoded: dict[int, list[int]] = {}
    too_short: set[int] = set()
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index not in encoded:
                encoded[index] = _encode(tokenizer, documents[index])
            ids = encoded[index]
            if len(ids) > seqlen:
                break
            too_short.add(index)
            if len(too_short) == len(documents):
                return None
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return windows


def evaluation_windows(documents: Sequence[str], tokenizer: Any, seqlen: int, max_windows: int | None = None,
                       source: str = "") -> TokenSet:
    """The WikiText-2 protocol's windows: documents joined with "\\n\\n", tokenized once, cut into
    non-overlapping windows of `seqlen` (the incomplete tail is dropped), the first `max_windows` kept."""
    ids = _encode(tokenizer, "\n\n".join(documents))
    count = len(ids) // seqlen
    if count == 0:
        raise DataSourceError(
            f"{source or 'evaluation text'} has {len(ids)} tokens, shorter than one window of {seqlen}"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    windows = torch.tensor(ids[: count * seqlen], dtype=torch.long).view(count, seqlen)
    return TokenSet(windows, source, {"protocol": "joined-nonoverlapping", "text_tokens": len(ids)})
