"""Models loaded from several threads at once (a Prefect flow's thread pool) leave transformers' global state intact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import PreTrainedModel

from perp.models import load_model
from perp.models.tiny import build_tiny_model


def _tied(model) -> bool:
    return model.lm_head.weight is model.model.decoder.embed_tokens.weight


def test_concurrent_loads_keep_weight_tying_and_initialisation(tiny_opt_dir):
    tie_weights, init_weights = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    normal = torch.nn.init.normal_
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = list(pool.map(lambda _: load_model(str(tiny_opt_dir), "cpu", "float32").model, range(24)))
    assert all(_tied(model) for model in loaded)
    reference = loaded[0].state_dict()
    assert all(torch.equal(model.state_dict()[name], tensor) for model in loaded for name, tensor in reference.items())
    # transformers patches these while it builds a model; racing threads used to leave the patches in place
    assert PreTrainedModel.tie_weights is tie_weights and PreTrainedModel.init_weights is init_weights
    assert torch.nn.init.normal_ is normal and torch.get_default_dtype() == torch.float32
    fresh = build_tiny_model("opt")
    assert _tied(fresh) and fresh.model.decoder.layers[0].fc1.weight.std() > 0
