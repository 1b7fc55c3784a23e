"""Family adapters: where each architecture keeps its decoder layers, Linears, norms, embeddings and LM head.

The rest of `perp` reaches model internals only through a `FamilyAdapter`, never through family-specific
attribute paths, so supporting a new architecture means adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from perp.errors import UnsupportedArchitectureError


def _get(root: nn.Module, path: str) -> Any:
    node: Any = root
    for part in path.split("."):
        node = getattr(node, part)
    return node


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and the RMSNorm variants (LlamaRMSNorm, Qwen2RMSNorm, ...), recognised by type or name."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str
    embedding_paths: tuple[str, ...]
    final_norm_path: str
    lm_head_path: str
    # Linears of a decoder layer that read the same input, so they can share calibration statistics.
    input_groups: tuple[tuple[str, ...], ...]

    # ---- structure
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Every nn.Linear inside one decoder layer, by its name relative to the layer."""
        return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}

    def weights_outside_linears(self, layer: nn.Module) -> list[str]:
        """Weight matrices of a decoder layer that no nn.Linear owns (fused MoE experts, custom projections):
        perp prunes and retrains Linears only, so such weights would silently stay dense."""
        owned = {f"{name}.{param}" if name else param
                 for name, module in layer.named_modules() if isinstance(module, nn.Linear)
                 for param, _ in module.named_parameters(recurse=False)}
        return [name for name, param in layer.named_parameters() if param.dim() >= 2 and name not in owned]

    def linear_groups(self, layer: nn.Module) -> list[list[str]]:
        """The layer's Linears grouped by shared input; Linears the adapter does not know form their own group."""
        present = self.linears(layer)
        groups: list[list[str]] = []
        seen: set[str] = set()
        for group in self.input_groups:
            members = [name for name in group if name in present]
            if members:
                groups.append(members)
                seen.update(members)
        groups.extend([name] for name in present if name not in seen)
        return groups

    def named_decoder_linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        for index, layer in enumerate(self.layers(model)):
            for name, linear in self.linears(layer).items():
                yield f"{self.layer_prefix(index)}.{name}", linear

    def named_norms(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Norms of the decoder layers and the final norm."""
        for name, module in model.named_modules():
            if is_norm(module):
                yield name, module

    def embeddings(self, model: nn.Module) -> list[nn.Embedding]:
        return [_get(model, path) for path in self.embedding_paths]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.final_norm_path)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return _get(model, self.lm_head_path)

    def ties_embeddings(self, model: nn.Module) -> bool:
        """True when the LM head shares its weight tensor with the input embeddings."""
        head = self.lm_head(model).weight
        embed = self.embeddings(model)[0].weight
        return head is embed or (not head.is_meta and head.data_ptr() == embed.data_ptr())  # meta: all ptrs 0

    # ---- measurements
    def decoder_sparsity(self, model: nn.Module) -> dict[str, float]:
        """Fraction of exact zeros in the decoder Linear weights, measured from the weights themselves."""
        zeros = total = 0
        for _, linear in self.named_decoder_linears(model):
            weight = linear.weight
            zeros += int((weight == 0).sum())
            total += weight.numel()
        return {"zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}


LLAMA = FamilyAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    embedding_paths=("model.embed_tokens",),
    final_norm_path="model.norm",
    lm_head_path="lm_head",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

OPT = FamilyAdapter(
    name="opt",
    model_types=("opt",),
    layers_path="model.decoder.layers",
    embedding_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm_path="model.decoder.final_layer_norm",
    lm_head_path="lm_head",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
)

FAMILIES: tuple[FamilyAdapter, ...] = (LLAMA, OPT)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


#: Mixture-of-experts model types. transformers keeps their experts as fused 3-D weight tensors, not nn.Linear,
#: so pruning would leave most of the weights dense while the decoder Linears report the target sparsity.
MIXTURE_OF_EXPERTS_TYPES = frozenset({
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe", "phimoe",
    "jamba", "granitemoe", "granitemoeshared", "llama4", "gpt_oss", "minimax", "ernie4_5_moe", "glm4_moe",
})


def adapter_for_model_type(model_type: str, architectures: list[str] | None = None) -> FamilyAdapter:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    arch = f" ({', '.join(architectures)})" if architectures else ""
    if model_type in MIXTURE_OF_EXPERTS_TYPES:
        raise UnsupportedArchitectureError(
            f"'{model_type}'{arch} is a mixture-of-experts model, which perp does not support yet: its experts are "
            f"fused weight tensors, not nn.Linear, so they would stay dense; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    raise UnsupportedArchitectureError(
        f"unsupported architecture '{model_type}'{arch}; supported model types: {', '.join(supported_model_types())}"
    )


def adapter_for(model_or_config: Any) -> FamilyAdapter:
    """The adapter for a model or its config; a clear error names an unsupported architecture."""
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for_model_type(getattr(config, "model_type", "unknown"), getattr(config, "architectures", None))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel()
    return total
