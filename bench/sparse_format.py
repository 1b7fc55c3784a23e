"""Size and speed of the perp-sparse checkpoint format on SmolLM2-135M.

    python bench/sparse_format.py [--model DIR] [--sparsity 0.5] [--gaussian]

Prunes each decoder Linear to the given sparsity by magnitude (per matrix), casts the whole model to bf16, saves
it as dense safetensors, packs it, unpacks it, and checks the round trip is byte-identical. `--gaussian` also
measures a model of the same shapes with N(0, 0.02) weights: SmolLM2 here is dequantised from Q4_1, whose few
distinct values per block compress unusually well, so the Gaussian figure is the conservative one.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from perp.store.sparse_format import pack_checkpoint, sha256_path, unpack_checkpoint

DECODER_LINEAR = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def prune_to_bf16(tensors: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if DECODER_LINEAR.search(name):
            k = int(tensor.numel() * sparsity)
            threshold = tensor.abs().flatten().kthvalue(k).values
            tensor = torch.where(tensor.abs() <= threshold, torch.zeros_like(tensor), tensor)
        out[name] = tensor.to(torch.bfloat16).contiguous()
    return out


def measure(label: str, tensors: dict[str, torch.Tensor], work: Path) -> dict:
    dense = work / f"{label}-dense"
    dense.mkdir()
    save_file(tensors, str(dense / "model.safetensors"), metadata={"format": "pt"})
    start = time.perf_counter()
    packed = pack_checkpoint(dense, work / f"{label}-packed")
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    unpack_checkpoint(work / f"{label}-packed", work / f"{label}-unpacked")
    unpack_s = time.perf_counter() - start
    rebuilt = work / f"{label}-unpacked" / "model.safetensors"
    identical = sha256_path(dense / "model.safetensors") == sha256_path(rebuilt)
    linear = [t for n, t in tensors.items() if DECODER_LINEAR.search(n)]
    zeros = sum(int((t == 0).sum()) for t in linear) / sum(t.numel() for t in linear)
    return {"model": label, "decoder_linear_sparsity": round(zeros, 4), "dense_bf16_bytes": packed["dense_bytes"],
            "packed_bytes": packed["packed_bytes"], "ratio": round(packed["ratio"], 4),
            "pack_s": round(pack_s, 2), "unpack_s": round(unpack_s, 2), "byte_identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser()
    default = sorted(glob.glob(os.path.join(os.environ.get("PERP_CACHE", "/tmp/perpcache"), "models", "SmolLM2-135M*")))
    parser.add_argument("--model", default=default[0] if default else None)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--gaussian", action="store_true")
    args = parser.parse_args()
    if not args.model:
        raise SystemExit("no SmolLM2 directory found; pass --model DIR")
    tensors = load_file(str(Path(args.model) / "model.safetensors"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure("smollm2", prune_to_bf16(tensors, args.sparsity), Path(tmp)))
        if args.gaussian:
            torch.manual_seed(0)
            gaussian = {n: torch.randn_like(t) * 0.02 if t.dim() == 2 else t for n, t in tensors.items()}
            results.append(measure("gaussian", prune_to_bf16(gaussian, args.sparsity), Path(tmp)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
