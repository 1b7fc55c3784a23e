"""Device visits return modules to the host storage they came from (perp.models.placement).

This machine has one device, so the tests make every tensor count as being elsewhere: the visit then works on
copies, exactly as it would on a GPU, and the host storage can be checked by address."""

from __future__ import annotations

import pytest
import torch

import perp.models.placement as placement
from perp.models.placement import Visit, visiting
from perp.models.tiny import build_tiny_model


@pytest.fixture
def always_elsewhere(monkeypatch):
    monkeypatch.setattr(placement, "_same_device", lambda a, b: False)


def _addresses(module: torch.nn.Module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def test_write_back_lands_in_the_original_host_storage(always_elsewhere):
    model = build_tiny_model("llama")
    layer = model.model.layers[0]
    before = _addresses(layer)
    visit = Visit(layer, "cpu")
    assert all(_addresses(layer)[name] != address for name, address in before.items())  # working on copies
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()
    visit.end()
    assert _addresses(layer) == before
    assert torch.count_nonzero(layer.mlp.down_proj.weight) == 0


def test_read_only_visit_drops_device_values_and_copies_nothing_back(always_elsewhere):
    model = build_tiny_model("llama")
    layer = model.model.layers[0]
    before = _addresses(layer)
    original = layer.self_attn.q_proj.weight.detach().clone()
    with visiting(layer, "cpu", write_back=False):
        with torch.no_grad():
            layer.self_attn.q_proj.weight.zero_()
    assert _addresses(layer) == before
    assert torch.equal(layer.self_attn.q_proj.weight, original)


def test_tied_weights_stay_tied_and_skipped_modules_stay(always_elsewhere):
    model = build_tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    layers_before = _addresses(model.model.layers)
    with visiting(model, "cpu", write_back=False, skip=(model.model.layers,)):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert _addresses(model.model.layers) == layers_before  # skipped: never moved
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_nothing_moves_when_already_on_the_device():
    model = build_tiny_model("opt")
    before = _addresses(model)
    visit = Visit(model, "cpu")
    assert _addresses(model) == before
    visit.end()
    assert _addresses(model) == before


@pytest.mark.parametrize("method, owl", [("sparsegpt", 0.0), ("wanda", 0.1)])
def test_engine_visits_give_the_same_pruned_model_in_the_same_storage(monkeypatch, method, owl):
    """The engine as it runs with a GPU (every layer and the stem visiting the device, then returning) prunes
    exactly as the in-place CPU run does, and the pruned weights end in the model's own host storage."""
    from perp.models.families import LLAMA
    from perp.prune import EngineOptions, PruneSpec, create_method, plan_pruning, prune_model

    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = PruneSpec(0.5, blocksize=32)

    def run():
        model = build_tiny_model("llama")
        before = _addresses(model)
        plans = plan_pruning(model, LLAMA, ["*"], [], spec)
        prune_model(model, LLAMA, create_method(method, spec), plans, ids, EngineOptions(owl_lambda=owl, owl_m=2.0))
        assert _addresses(model) == before
        return model.state_dict()

    reference = run()
    monkeypatch.setattr(placement, "_same_device", lambda a, b: False)
    visited = run()
    assert all(torch.equal(reference[name], visited[name]) for name in reference)
    assert any(torch.count_nonzero(t) < t.numel() for name, t in visited.items() if name.endswith("proj.weight"))


def test_a_failed_move_puts_back_what_had_moved(always_elsewhere, monkeypatch):
    model = build_tiny_model("llama")
    layer = model.model.layers[0]
    before = _addresses(layer)
    real_to, calls = torch.Tensor.to, []

    def failing_to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("no room on the device")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(torch.OutOfMemoryError):
        Visit(layer, "cpu")
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert _addresses(layer) == before


def test_shared_buffers_move_for_every_owner_and_replaced_entries_are_not_aliased(always_elsewhere):
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    shared = torch.arange(4.0)
    first.register_buffer("table", shared)
    second.register_buffer("table", shared)
    pair = torch.nn.ModuleList([first, second])
    weight_home = first.weight.data_ptr()
    visit = Visit(pair, "cpu")
    assert first.table is second.table and first.table is not shared  # one device copy for both owners
    first.weight = torch.nn.Parameter(torch.zeros(4, 4))  # replaced during the visit (e.g. untied)
    visit.end()
    assert first.table is shared and second.table is shared
    assert first.weight.data_ptr() != weight_home and torch.count_nonzero(first.weight) == 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layered_perplexity_visits_leave_the_model_as_it_was(monkeypatch, family):
    from perp.data.windows import TokenSet
    from perp.evaluate.layered import layered_perplexity
    from perp.models.families import adapter_for

    model = build_tiny_model(family, seed=3).eval()
    windows = TokenSet(ids=torch.randint(0, 259, (3, 16), generator=torch.Generator().manual_seed(0)), source="x")
    reference = layered_perplexity(model, adapter_for(model), windows, "cpu").ppl
    before, values = _addresses(model), {name: t.clone() for name, t in model.state_dict().items()}
    monkeypatch.setattr(placement, "_same_device", lambda a, b: False)
    assert layered_perplexity(model, adapter_for(model), windows, "cpu").ppl == reference
    assert _addresses(model) == before
    assert all(torch.equal(tensor, values[name]) for name, tensor in model.state_dict().items())


def test_fused_reconstruction_trains_the_visiting_copy_and_writes_it_home(monkeypatch, tiny_llama_dir, tmp_path):
    """Recovery fused with pruning retrains each layer while it visits the device: with every tensor counted as
    elsewhere (copied there and back), the output is bit-identical to the in-place run."""
    from safetensors.torch import load_file

    from perp.config import load_params
    from perp.recover.fused import run_fused

    config = load_params(None, [f"model.name={tiny_llama_dir}", "model.device=cpu", "data.calibration.seqlen=32",
                                "data.calibration.nsamples=4", "data.evaluation.seqlen=32",
                                "data.evaluation.max_windows=1", "recover.method=norm+masklora", "recover.steps=2",
                                "recover.rank=4", "recover.lr=0.01"])
    run_fused(config, tmp_path / "here")
    monkeypatch.setattr(placement, "_same_device", lambda a, b: False)
    run_fused(config, tmp_path / "visited")
    reference, visited = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("here", "visited"))
    assert reference.keys() == visited.keys()
    assert all(torch.equal(reference[name], visited[name]) for name in reference)
    trained = load_file(str(tmp_path / "here" / "adapter.safetensors"))
    norm = next(name for name in trained if name.endswith("input_layernorm.weight"))
    assert not torch.equal(trained[norm], torch.ones_like(trained[norm]))  # the norms did train
    assert torch.equal(reference[norm].float(), trained[norm])  # and were written into the saved model
