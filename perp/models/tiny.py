"""Tiny, randomly initialised LLaMA- and OPT-shaped models with a byte-level tokenizer.

They need nothing but the installed packages, so tests, smoke runs and CI can exercise the whole pipeline in
seconds. They are reachable as the model aliases `tiny-llama` and `tiny-opt`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast)

from perp.models.construction import one_model_at_a_time

TINY_FAMILIES = ("llama", "opt")
_SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols + <s>, </s>, <unk>): lossless on any text, fully offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_config(family: str, vocab_size: int = 259, hidden: int = 64, layers: int = 2, intermediate: int = 128,
                heads: int = 4) -> LlamaConfig | OPTConfig:
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=hidden,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, enable_bias=True,
        )
    raise ValueError(f"unknown tiny family '{family}' (allowed: {', '.join(TINY_FAMILIES)})")


def build_tiny_model(family: str = "llama", seed: int = 0, **shape: int) -> PreTrainedModel:
    """A randomly initialised model, identical for the same family, shape and seed."""
    config = tiny_config(family, **shape)
    torch.manual_seed(seed)
    model_class: type[PreTrainedModel] = LlamaForCausalLM if family == "llama" else OPTForCausalLM
    with one_model_at_a_time():
        model = model_class(config).float().eval()
    if family == "llama":
        # Random norms and biases make tests that train or compare them meaningful (defaults are all ones).
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.8, 1.2)
    return model


def save_tiny_model(directory: str | Path, family: str = "llama", seed: int = 0, **shape: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_model(family, seed, **shape).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory
