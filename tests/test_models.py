import re
from pathlib import Path

import boto3
import pytest
import torch
from transformers import AutoModelForCausalLM

from perp.errors import ModelSourceError, UnsupportedArchitectureError
from perp.io.s3 import S3Error
from perp.models import adapter_for, count_parameters, load_model, model_info
from perp.models.families import LLAMA, OPT
from perp.models.tiny import build_tiny_model


@pytest.mark.parametrize("family, adapter", [("llama", LLAMA), ("opt", OPT)])
def test_adapter_finds_layers_linears_norms_and_head(family, adapter):
    model = build_tiny_model(family)
    assert adapter_for(model) is adapter
    assert adapter.num_layers(model) == 2
    layer = adapter.layers(model)[0]
    linears = adapter.linears(layer)
    assert len(linears) == (7 if family == "llama" else 6)
    groups = adapter.linear_groups(layer)
    assert groups[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert sorted(sum(groups, [])) == sorted(linears)
    norms = dict(adapter.named_norms(model))
    assert len(norms) == 2 * 2 + 1  # two per layer + the final norm
    assert adapter.final_norm(model) in norms.values()
    assert adapter.lm_head(model).weight.shape[0] == model.config.vocab_size
    assert not adapter.ties_embeddings(model) if family == "llama" else adapter.ties_embeddings(model)
    assert len(list(adapter.named_decoder_linears(model))) == 2 * len(linears)


def test_decoder_sparsity_is_measured_from_weights():
    model = build_tiny_model("llama")
    assert LLAMA.decoder_sparsity(model)["sparsity"] == 0.0
    with torch.no_grad():
        for _, linear in LLAMA.named_decoder_linears(model):
            linear.weight[:, ::2] = 0
    assert LLAMA.decoder_sparsity(model)["sparsity"] == pytest.approx(0.5)
    # The LM head and embeddings are not decoder Linears.
    assert count_parameters(model) > LLAMA.decoder_sparsity(model)["total"]


def _tiny_config_of(model_type: str):
    from transformers import AutoConfig

    if model_type == "opt":
        return AutoConfig.for_model("opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64)
    return AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.mark.parametrize("model_type", [t for family in (LLAMA, OPT) for t in family.model_types])
def test_every_supported_model_type_keeps_its_weights_in_the_linears_its_adapter_names(model_type):
    """What transformers builds for each supported type matches its adapter: the decoder layers where the adapter
    looks, every weight matrix in an nn.Linear (else it would stay dense), every input group's Linears present
    (else statistics would not be shared)."""
    config = _tiny_config_of(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    assert adapter.num_layers(model) == 2
    for layer in adapter.layers(model):
        assert adapter.weights_outside_linears(layer) == []
        present = adapter.linears(layer)
        assert all(name in present for group in adapter.input_groups for name in group), sorted(present)
    assert adapter.final_norm(model) is not None and adapter.lm_head(model).weight.shape[0] == 64


def test_mixture_of_experts_types_are_named_in_the_error():
    from perp.models.families import adapter_for_model_type

    with pytest.raises(UnsupportedArchitectureError, match="'qwen3_moe' is a mixture-of-experts model"):
        adapter_for_model_type("qwen3_moe")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2' \\(GPT2LMHeadModel\\)"):
        load_model(str(tmp_path))


def test_local_directory_loads_with_family_and_hash(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.kind == "local" and loaded.family is LLAMA
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    info = model_info(loaded)
    assert info["layers"] == 2 and info["decoder_sparsity"] == 0.0
    assert len(loaded.content_hash) == 64
    assert loaded.content_hash == load_model(str(tiny_llama_dir)).content_hash


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="without config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="Hub is offline"):
        load_model("some-org/some-model-that-is-not-cached")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_bytes_from_headers_equal_the_loaded_weights(tiny_llama_dir, dtype):
    from perp.models.loading import checkpoint_bytes

    loaded = load_model(str(tiny_llama_dir), "cpu", str(dtype).removeprefix("torch."), load_to_device=False)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in loaded.model.state_dict().values()}
    assert checkpoint_bytes(tiny_llama_dir, dtype) == sum(unique.values())


def test_checkpoint_bytes_count_only_the_weights_transformers_loads(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from perp.models.loading import checkpoint_bytes

    recovered = tmp_path / "recovered"
    shutil.copytree(tiny_llama_dir, recovered)
    for name in ("masks.safetensors", "adapter.safetensors"):  # what a recovery writes beside the weights
        save_file({"x": torch.zeros(1000, 1000)}, str(recovered / name))
    assert checkpoint_bytes(recovered, torch.float32) == checkpoint_bytes(tiny_llama_dir, torch.float32)


def _copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_truncated_weight_file_is_one_line_on_every_load(tiny_llama_dir, tmp_path):
    """The header parses, but the tensors run past the end of the file: safetensors' own error was a traceback."""
    damaged = _copy(tiny_llama_dir, tmp_path / "truncated")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelSourceError, match="model.safetensors' is not a readable safetensors file .*truncated"):
        load_model(str(damaged), "cpu", load_to_device=False)


def test_sharded_checkpoints_load_and_a_missing_shard_is_named(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    sharded = _copy(tiny_llama_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="50KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert load_model(str(sharded), "cpu", load_to_device=False).content_hash
    shards[1].unlink()
    with pytest.raises(ModelSourceError, match=f"'{shards[1]}' is missing: the checkpoint's shard index names it"):
        load_model(str(sharded), "cpu", load_to_device=False)


def test_a_stale_shard_index_beside_model_safetensors_is_ignored_as_transformers_does(tiny_llama_dir, tmp_path):
    from perp.models.loading import checkpoint_bytes

    stale = _copy(tiny_llama_dir, tmp_path / "stale")
    (stale / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}')
    loaded = load_model(str(stale), "cpu", load_to_device=False)
    assert loaded.family is LLAMA
    assert checkpoint_bytes(stale, torch.float32) == checkpoint_bytes(tiny_llama_dir, torch.float32)


def test_a_model_directory_without_tokenizer_says_so(tiny_llama_dir, tmp_path):
    from perp.models.loading import load_tokenizer

    bare = _copy(tiny_llama_dir, tmp_path / "bare")
    for file in bare.glob("tokenizer*"):
        file.unlink()
    message = f"'{bare}' has no tokenizer (tokenizer.json, tokenizer.model, ...); copy the base model's tokenizer"
    with pytest.raises(ModelSourceError, match=re.escape(message)):
        load_model(str(bare), "cpu", load_to_device=False)
    with pytest.raises(ModelSourceError, match="has no tokenizer"):
        load_tokenizer(str(bare))


def test_a_model_larger_than_the_free_device_memory_fails_before_loading(tiny_llama_dir, monkeypatch):
    import perp.models.loading as loading

    needed = loading.checkpoint_bytes(tiny_llama_dir, torch.bfloat16)
    monkeypatch.setattr(loading, "resolve_device_dtype", lambda device, dtype: (torch.device("cuda"), torch.bfloat16))
    monkeypatch.setattr(loading, "device_free_bytes", lambda device: needed)  # no room left for activations

    def never(*args, **kwargs):
        raise AssertionError("the weights were read although they cannot fit")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelSourceError, match=r"needs 0\.0 GiB on cuda for its weights in bfloat16, but 0\.0 GiB is "
                                               r"free: it cannot be loaded whole; .*evaluate\.offload: true"):
        load_model(str(tiny_llama_dir), "cuda", "bfloat16")
    monkeypatch.setattr(loading, "device_free_bytes", lambda device: 2 * needed)
    loading.require_fits_device("m", tiny_llama_dir, torch.device("cuda"), torch.bfloat16)
    loading.require_fits_device("m", tiny_llama_dir, torch.device("cpu"), torch.bfloat16)  # host memory: no check


def test_tiny_aliases_are_deterministic():
    first, second = load_model("tiny-opt"), load_model("tiny-opt")
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def _upload_dir(bucket: str, prefix: str, directory: Path) -> None:
    from perp.io.hashing import sha256_file

    client = boto3.client("s3")
    for path in directory.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}",
                           ExtraArgs={"Metadata": {"sha256": sha256_file(path)}})


def test_s3_model_is_downloaded_once_and_verified(s3_bucket, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PERP_CACHE", str(tmp_path / "cache"))
    _upload_dir(s3_bucket, "models/tiny", tiny_llama_dir)
    uri = f"s3://{s3_bucket}/models/tiny"
    loaded = load_model(uri)
    assert loaded.kind == "s3"
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert torch.equal(loaded.model.lm_head.weight, reference.lm_head.weight)

    # Corrupt the object behind the recorded sha256: the next download must refuse it.
    from perp.io.s3 import clear_cached

    clear_cached(uri)
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="models/tiny/model.safetensors", Body=b"corrupted",
                      Metadata={"sha256": "0" * 64})
    with pytest.raises(S3Error, match="checksum mismatch for s3://.*/models/tiny/model.safetensors"):
        load_model(uri)


def test_missing_s3_object_names_the_uri(s3_bucket):
    with pytest.raises(S3Error, match=f"nothing at s3://{s3_bucket}/absent"):
        load_model(f"s3://{s3_bucket}/absent")
