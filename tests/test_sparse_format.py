"""The perp-sparse checkpoint format: exact round trip, size, corruption, hostile input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perp.store.sparse_format import (
    INDEX_FILE,
    PACKED_SUFFIX,
    SparseFormatError,
    pack_checkpoint,
    pack_file,
    sha256_path,
    unpack_checkpoint,
    unpack_file,
)
from perp.store.testing import cached_pruned_tiny


@pytest.fixture(scope="module")
def pruned():
    return cached_pruned_tiny()


def test_checkpoint_round_trip_is_byte_identical_and_loads_with_transformers(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    report = pack_checkpoint(pruned, tmp_path / "packed")
    packed_files = sorted(p.name for p in (tmp_path / "packed").iterdir())
    assert "model" + PACKED_SUFFIX in packed_files and "model.safetensors" not in packed_files
    assert INDEX_FILE in packed_files
    assert report["packed_bytes"] < report["dense_bytes"]
    # The packed file is itself a valid safetensors file (parsed by the official reader).
    with safe_open(str(tmp_path / "packed" / ("model" + PACKED_SUFFIX)), framework="np") as handle:
        assert json.loads(handle.metadata()["perp"])["format"] == "perp-sparse"

    unpack_checkpoint(tmp_path / "packed", tmp_path / "dense")
    for source in sorted(p for p in pruned.iterdir() if p.is_file() and not p.name.startswith(".")):
        assert sha256_path(tmp_path / "dense" / source.name) == sha256_path(source), source.name

    original = AutoModelForCausalLM.from_pretrained(pruned)
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for (name, a), (_, b) in zip(original.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b), name


def test_every_dtype_and_bit_pattern_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(33, 17, generator=generator)
    sparse = dense.clone()
    sparse[sparse.abs() < 0.7] = 0
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 0.0, 3.0])
    tensors = {
        "f32.sparse": sparse, "f32.dense": dense, "f32.specials": specials,
        "bf16.sparse": sparse.to(torch.bfloat16), "bf16.specials": specials.to(torch.bfloat16),
        "f16.sparse": sparse.to(torch.float16), "f64.sparse": sparse.to(torch.float64),
        "i64": torch.tensor([0, 0, 0, -1, 2**62, 0, 0]), "i8": torch.tensor([0, 0, -3, 0], dtype=torch.int8),
        "u8": torch.zeros(11, dtype=torch.uint8), "bool": torch.tensor([True, False, False, True]),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(0.0), "all.zero": torch.zeros(5, 3),
        "odd.count": torch.tensor([0.0] * 6 + [1.5]),
    }
    source = tmp_path / "w.safetensors"
    save_file(tensors, str(source), metadata={"format": "pt", "note": "kept"})
    info = pack_file(source, tmp_path / "w.packed.safetensors")
    assert info["sparse_tensors"] >= 5
    unpack_file(tmp_path / "w.packed.safetensors", tmp_path / "w.out.safetensors")
    assert (tmp_path / "w.out.safetensors").read_bytes() == source.read_bytes()


def test_bytes_outside_any_tensor_survive(tmp_path):
    # A hand-written file with a gap between tensors and trailing bytes: still rebuilt byte for byte.
    a = np.array([0, 0, 1, 0], dtype="<f4").tobytes()
    b = np.array([7, 0], dtype="<i2").tobytes()
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "I16", "shape": [2], "data_offsets": [24, 28]}}
    encoded = json.dumps(header).encode()
    data = a + b"GAPBYTES" + b + b"TAIL"
    source = tmp_path / "gappy.safetensors"
    source.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    pack_file(source, tmp_path / "gappy.packed")
    unpack_file(tmp_path / "gappy.packed", tmp_path / "gappy.out")
    assert (tmp_path / "gappy.out").read_bytes() == source.read_bytes()


def test_half_sparse_bf16_is_under_60_percent_of_dense(tmp_path):
    # SmolLM2's mix: ~21% of the parameters (embeddings) stay dense, decoder Linears are 50% sparse.
    generator = torch.Generator().manual_seed(0)
    tensors = {"embed": (torch.randn(1024, 256, generator=generator) * 0.02).to(torch.bfloat16)}
    for i in range(4):
        weight = torch.randn(256, 960, generator=generator) * 0.02
        weight[weight.abs() <= weight.abs().flatten().kthvalue(weight.numel() // 2).values] = 0
        tensors[f"layers.{i}.proj.weight"] = weight.to(torch.bfloat16)
    model = tmp_path / "model"
    model.mkdir()
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    report = pack_checkpoint(model, tmp_path / "packed")
    assert report["ratio"] <= 0.60, report["ratio"]


def test_corrupted_packed_file_is_an_error_and_leaves_nothing(pruned, tmp_path):
    pack_checkpoint(pruned, tmp_path / "packed")
    packed = tmp_path / "packed" / ("model" + PACKED_SUFFIX)
    data = bytearray(packed.read_bytes())
    data[-100] ^= 0x01  # one bit in the last tensor part
    packed.write_bytes(bytes(data))
    with pytest.raises(SparseFormatError, match="sha256|corrupt|disagree|expected"):
        unpack_checkpoint(tmp_path / "packed", tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dense")]


def test_non_safetensors_input_is_refused_without_unpickling(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil = tmp_path / "model"
    evil.mkdir()
    (evil / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(SparseFormatError, match="not a safetensors file"):
        pack_checkpoint(evil, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    with pytest.raises(SparseFormatError, match="not a perp-sparse file"):
        unpack_file(evil / "model.safetensors", tmp_path / "x.safetensors")


def test_index_with_a_traversal_path_is_refused(pruned, tmp_path):
    pack_checkpoint(pruned, tmp_path / "packed")
    index_path = tmp_path / "packed" / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["files"]["../escaped.json"] = index["files"].pop("config.json")
    index_path.write_text(json.dumps(index))
    with pytest.raises(SparseFormatError, match="unsafe path"):
        unpack_checkpoint(tmp_path / "packed", tmp_path / "dense")
    assert not (tmp_path / "escaped.json").exists()
