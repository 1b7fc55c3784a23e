"""Pruning masks as bitmasks: 1 bit per weight, True where a weight is *kept*.

`masks.safetensors` holds one uint8 tensor per pruned Linear (its full module name): the row-major kept-mask
packed 8 weights per byte, little bit order (`numpy.packbits(..., bitorder="little")`: weight 8k+i is bit i of
byte k). The shapes live in the file's metadata, so `load_masks` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from perp.errors import DataSourceError
from perp.layout import MASKS_FILE

FORMAT = "perp-bitmask-v1"
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class PackedMask:
    """A bool mask packed 8 per byte (little bit order), with its shape."""

    bits: torch.Tensor  # uint8 [ceil(numel / 8)] on CPU
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape)

    def count(self) -> int:
        """Number of True entries."""
        return int(_POPCOUNT[self.bits.long()].sum())


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


@torch.no_grad()
def pack_mask(mask: torch.Tensor) -> PackedMask:
    """Pack a bool tensor (any device; packed there, so only 1/8 of it travels to CPU)."""
    if mask.device.type == "cpu":
        import numpy as np

        packed = np.packbits(mask.detach().reshape(-1).numpy(), bitorder="little")
        return PackedMask(bits=torch.from_numpy(packed), shape=tuple(mask.shape))
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)
    return PackedMask(bits=bits.cpu(), shape=tuple(mask.shape))


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    expanded = (bits.to(torch.uint8).unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)).ne(0).reshape(-1)
    return expanded[:numel].reshape(shape)


def save_masks(masks: dict[str, PackedMask], path: str | Path) -> None:
    """A standard safetensors file, byte for byte the same for the same masks (safetensors' own writer orders
    the metadata keys differently from run to run, which would change the checkpoint's content hash)."""
    import struct

    shapes = {name: list(packed.shape) for name, packed in masks.items()}
    header: dict[str, object] = {"__metadata__": {"format": FORMAT, "bitorder": "little", "meaning": "True=kept",
                                                  "shapes": json.dumps(shapes, sort_keys=True)}}
    offset = 0
    for name in sorted(masks):
        size = masks[name].bits.numel()
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in sorted(masks):
            out.write(masks[name].bits.to(torch.uint8).contiguous().numpy().tobytes())


def load_packed_masks(path: str | Path) -> dict[str, PackedMask]:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise DataSourceError(f"no pruning masks at {path} (expected the {MASKS_FILE} that `perp prune` writes)")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise DataSourceError(f"{path} is not a perp bitmask file (format {metadata.get('format')!r})")
        shapes = json.loads(metadata["shapes"])
        return {name: PackedMask(handle.get_tensor(name), tuple(shapes[name])) for name in handle.keys()}


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Full Linear name → bool mask shaped like its weight, True where the weight is kept.

    `path` is a `perp prune` output directory or its masks.safetensors file.
    """
    return {name: packed.unpack() for name, packed in load_packed_masks(path).items()}
