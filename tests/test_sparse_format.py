"""The perp-sparse checkpoint format: exact round trip, size, corruption, hostile input."""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------------------------- one read, digests


def _stream(n: int, seed: str) -> bytes:
    """Deterministic incompressible bytes (sha256 in counter mode), identical on every platform."""
    import hashlib

    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def _golden_source(path):
    """A sparse F32 tensor, a gap, a dense BF16 tensor, an all-zero I16 tensor and trailing bytes; its planes
    are incompressible, so the packed bytes do not depend on the zlib build."""
    a = np.frombuffer(_stream(4096 * 4, "a"), dtype="<u4").copy()
    a[np.frombuffer(_stream(4096, "mask"), dtype=np.uint8) < 128] = 0
    b = np.frombuffer(_stream(1000 * 2, "b"), dtype="<u2")
    c = np.zeros(64, dtype="<u2")
    data = a.tobytes() + b"\x07" * 5 + b.tobytes() + c.tobytes() + b"tail"
    o1 = a.nbytes
    o2 = o1 + 5
    o3 = o2 + b.nbytes
    o4 = o3 + c.nbytes
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, o1]},
              "b": {"dtype": "BF16", "shape": [1000], "data_offsets": [o2, o3]},
              "c": {"dtype": "I16", "shape": [8, 8], "data_offsets": [o3, o4]}}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


# sha256 of the source and of its packed form as written by perp before packing learnt to hash while writing:
# the format is frozen, so these must never change.
GOLDEN_SOURCE_SHA = "3756edd64ffa831602b31993b1d947667a38dbf038c802ae195d44596304083a"
GOLDEN_PACKED_SHA = "1abbbad79211bf1b23c9adaf5d63b93614746ac92457ccd5d5d413835ebee8ca"


@pytest.fixture
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def counted_hashing(monkeypatch):
    """Counts every whole-file hash (perp.io.hashing.sha256_file and sparse_format.sha256_path) by path."""
    import perp.io.hashing
    import perp.store.sparse_format

    calls: list[str] = []
    real_file, real_path = perp.io.hashing.sha256_file, perp.store.sparse_format.sha256_path

    def counted(real):
        def hash_file(path):
            calls.append(str(path))
            return real(path)
        return hash_file

    monkeypatch.setattr(perp.io.hashing, "sha256_file", counted(real_file))
    monkeypatch.setattr(perp.store.sparse_format, "sha256_path", counted(real_path))
    return calls


@pytest.mark.parametrize("fsync", [True, False])
def test_packed_bytes_are_unchanged_and_their_sha256_is_returned(tmp_path, hash_cache, fsync):
    source = _golden_source(tmp_path / "g.safetensors")
    assert sha256_path(source) == GOLDEN_SOURCE_SHA
    info = pack_file(source, tmp_path / "g.packed", fsync=fsync)
    assert info["sha256"] == GOLDEN_SOURCE_SHA
    assert info["packed_sha256"] == sha256_path(tmp_path / "g.packed") == GOLDEN_PACKED_SHA
    assert info["packed_size"] == (tmp_path / "g.packed").stat().st_size
    unpack_file(tmp_path / "g.packed", tmp_path / "g.out")
    assert (tmp_path / "g.out").read_bytes() == source.read_bytes()


def test_packed_sha256_matches_for_a_real_checkpoint_and_seeds_the_hash_cache(pruned, tmp_path, hash_cache,
                                                                             counted_hashing):
    from perp.io.hashing import cached_sha256

    info = pack_file(pruned / "model.safetensors", tmp_path / "m.packed")
    assert counted_hashing == []
    assert cached_sha256(tmp_path / "m.packed") == info["packed_sha256"]  # from the cache: no read
    assert cached_sha256(pruned / "model.safetensors") == info["sha256"]
    assert counted_hashing == []
    assert info["packed_sha256"] == sha256_path(tmp_path / "m.packed")
    assert info["sha256"] == sha256_path(pruned / "model.safetensors")


def test_packing_does_not_rehash_a_source_whose_digest_is_cached(tmp_path, hash_cache, counted_hashing):
    from perp.io.hashing import cached_sha256

    source = _golden_source(tmp_path / "g.safetensors")
    assert cached_sha256(source) == GOLDEN_SOURCE_SHA  # what register_version does first
    assert counted_hashing == [str(source.resolve())]
    counted_hashing.clear()
    info = pack_file(source, tmp_path / "g.packed")
    assert counted_hashing == []
    assert info["sha256"] == GOLDEN_SOURCE_SHA and info["packed_sha256"] == GOLDEN_PACKED_SHA


def test_an_uncached_source_is_hashed_from_the_bytes_read_for_packing(tmp_path, hash_cache, counted_hashing):
    from perp.io.hashing import cached_sha256, lookup_sha256

    source = _golden_source(tmp_path / "g.safetensors")
    assert lookup_sha256(source) is None
    info = pack_file(source, tmp_path / "g.packed")
    assert info["sha256"] == GOLDEN_SOURCE_SHA
    assert cached_sha256(source) == GOLDEN_SOURCE_SHA  # seeded by pack_file
    assert counted_hashing == []


def test_a_source_modified_after_hashing_is_hashed_again(tmp_path, hash_cache):
    from perp.io.hashing import cached_sha256

    source = _golden_source(tmp_path / "g.safetensors")
    cached_sha256(source)
    data = bytearray(source.read_bytes())
    data[-1] ^= 1  # same size; a new mtime
    source.write_bytes(bytes(data))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10_000_000))
    info = pack_file(source, tmp_path / "g.packed")
    assert info["sha256"] == sha256_path(source) != GOLDEN_SOURCE_SHA
    unpack_file(tmp_path / "g.packed", tmp_path / "g.out")
    assert (tmp_path / "g.out").read_bytes() == source.read_bytes()


def test_a_source_that_changes_while_packed_is_refused(tmp_path, hash_cache, monkeypatch):
    from perp.store import sparse_format

    source = _golden_source(tmp_path / "g.safetensors")
    real = sparse_format._encode_plane

    def touch_then_encode(plane):
        stat = source.stat()
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        return real(plane)

    monkeypatch.setattr(sparse_format, "_encode_plane", touch_then_encode)
    with pytest.raises(SparseFormatError, match="changed while it was being packed"):
        pack_file(source, tmp_path / "g.packed")
    assert not (tmp_path / "g.packed").exists()


@pytest.mark.parametrize("workers", [2, 5])
def test_threaded_packing_and_unpacking_give_the_same_bytes_as_one_thread(pruned, tmp_path, workers):
    source = pruned / "model.safetensors"
    one = pack_file(source, tmp_path / "one" / "m.perp-sparse.safetensors", workers=1)
    many = pack_file(source, tmp_path / "many" / "m.perp-sparse.safetensors", workers=workers)
    assert one == many
    assert sha256_path(tmp_path / "one" / "m.perp-sparse.safetensors") == many["packed_sha256"]
    unpack_file(tmp_path / "many" / "m.perp-sparse.safetensors", tmp_path / "back.safetensors", workers=workers)
    assert sha256_path(tmp_path / "back.safetensors") == sha256_path(source)


def test_a_corrupt_part_fails_a_threaded_unpack_and_leaves_nothing(pruned, tmp_path):
    packed = tmp_path / "m.perp-sparse.safetensors"
    pack_file(pruned / "model.safetensors", packed, workers=3)
    with safe_open(str(packed), framework="np") as handle:
        metadata = handle.metadata()
        parts = {key: handle.get_tensor(key) for key in handle.keys()}
    description = json.loads(metadata["perp"])
    sparse = next(entry for entry in description["entries"] if entry["kind"] == "sparse")
    label = sparse["mask"][0]
    parts[label] = parts[label][:-1]  # one mask byte short, in a tensor in the middle of the file
    from safetensors.numpy import save_file as save_numpy

    save_numpy(parts, str(packed), metadata=metadata)
    with pytest.raises(SparseFormatError, match="expected .* bytes"):
        unpack_file(packed, tmp_path / "out" / "model.safetensors", workers=3)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pack_workers_come_from_the_environment(monkeypatch):
    from perp.store.sparse_format import default_workers

    monkeypatch.setenv("PERP_PACK_WORKERS", "3")
    assert default_workers() == 3
    for bad in ("0", "65", "²", "٣", "-1", "2.5"):
        monkeypatch.setenv("PERP_PACK_WORKERS", bad)
        expected = f"PERP_PACK_WORKERS must be a whole number from 1 to 64, got '{bad}'"
        with pytest.raises(SparseFormatError, match=expected):
            default_workers()
    monkeypatch.delenv("PERP_PACK_WORKERS")
    assert 1 <= default_workers() <= 4


def test_a_bad_pack_workers_setting_fails_registration_and_pull_before_any_work(pruned, tmp_path, monkeypatch):
    from perp.registry import RegistryError, pull, register_version

    monkeypatch.setenv("PERP_PACK_WORKERS", "many")
    with pytest.raises(RegistryError, match="PERP_PACK_WORKERS must be a whole number"):
        register_version(str(tmp_path / "store"), "m", pruned)
    with pytest.raises(RegistryError, match="PERP_PACK_WORKERS must be a whole number"):
        pull(str(tmp_path / "store"), "m@latest", tmp_path / "out")
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 3])
def test_unpacking_holds_a_few_tensors_at_a_time_not_the_file(tmp_path, workers):
    import tracemalloc

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(24):  # 24 tensors of 1 MiB each, half zeros
        weight = torch.randn(512, 1024, generator=generator)
        tensors[f"layers.{i}.weight"] = torch.where(weight.abs() < 0.674, torch.zeros_like(weight), weight).to(
            torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    pack_file(tmp_path / "model.safetensors", tmp_path / "model.perp-sparse.safetensors", workers=workers)
    tracemalloc.start()
    try:
        unpack_file(tmp_path / "model.perp-sparse.safetensors", tmp_path / "back.safetensors", workers=workers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sha256_path(tmp_path / "back.safetensors") == sha256_path(tmp_path / "model.safetensors")
    assert peak < (workers + 3) * 2 * 2**20, peak  # a few tensors and their decoding buffers; the file is 24 MiB
