"""Visiting the compute device one module at a time, returning to the host memory the module came from.

`module.to("cuda")` and back allocates the module's host memory anew on every return: for a 7B decoder layer
that is 400 MB of fresh pages (faulted in and zeroed by the kernel) per layer and pass, about as long as the copy
itself. A visit instead remembers each tensor's host storage and, on the way back, writes the device copy into
it (or, for a module the visit did not modify, simply points the tensor back at it: no copy at all).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

_Moved = list[tuple[nn.Module, str, bool, torch.Tensor, torch.Tensor]]  # owner, name, is_param, entry, home


class Visit:
    """The parameters and buffers of `modules` (except those owned by `skip` and its children) on `device`
    until `end()` puts them back in their original storage. Tensors move in place (`param.data`), so tied
    weights stay tied and optimizers or hooks keep their objects."""

    def __init__(self, modules: nn.Module | list[nn.Module], device: torch.device | str,
                 skip: tuple[nn.Module, ...] = ()) -> None:
        self._moved = _move(modules if isinstance(modules, list) else [modules], torch.device(device), skip)

    def end(self, write_back: bool = True) -> None:
        """Back to host storage. With `write_back`, what changed on the device is copied into it; without, the
        device values are dropped (for a visit that only read the module)."""
        moved, self._moved = self._moved, []
        _return(moved, write_back)


@contextlib.contextmanager
def visiting(modules: nn.Module | list[nn.Module], device: torch.device | str, write_back: bool = True,
             skip: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """A `Visit` for the duration of the block."""
    visit = Visit(modules, device, skip)
    try:
        yield
    finally:
        visit.end(write_back)


def _move(modules: list[nn.Module], device: torch.device, skip: tuple[nn.Module, ...]) -> _Moved:
    """Move every parameter and buffer entry; on any failure (out of device memory...) put back what moved."""
    skipped = {id(m) for owner in skip for m in owner.modules()}
    copies: dict[int, torch.Tensor] = {}  # id(original tensor) → its device copy (shared tensors move once)
    moved: _Moved = []
    try:
        for root in modules:
            for module in root.modules():
                if id(module) in skipped:
                    continue
                for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
                    for name, tensor in table.items():
                        if tensor is None or _same_device(tensor.device, device):
                            continue
                        home = tensor.data if is_parameter else tensor
                        if is_parameter:  # moved in place: the entry stays the same Parameter object
                            if id(tensor) not in copies:  # a tied parameter is one object: move its data once
                                copies[id(tensor)] = home.to(device, copy=True)
                                tensor.data = copies[id(tensor)]
                            moved.append((module, name, True, tensor, home))
                        else:  # the entry is replaced; every module that shares the buffer gets the same copy
                            if id(tensor) not in copies:
                                copies[id(tensor)] = home.to(device, copy=True)
                            module._buffers[name] = copies[id(tensor)]
                            moved.append((module, name, False, copies[id(tensor)], home))
    except BaseException:
        _return(moved, write_back=False)
        raise
    return moved


def _return(moved: _Moved, write_back: bool) -> None:
    """Point every moved entry back at its host storage, first copying the device values into it if
    `write_back`. An entry replaced during the visit (a new parameter or buffer object) is moved to the host as it
    is, never aliased to the storage of the one it replaced."""
    written: set[int] = set()
    for module, name, is_parameter, entry, home in reversed(moved):
        table: dict[str, Any] = module._parameters if is_parameter else module._buffers
        current = table.get(name)
        if current is None:
            continue
        if current is not entry:
            table[name] = _to_host(current, home.device, is_parameter)
            continue
        value = current.data if is_parameter else current
        if write_back and id(home) not in written and value is not home:
            home.copy_(value)
            written.add(id(home))
        if is_parameter:
            current.data = home
        else:
            table[name] = home


def _to_host(tensor: torch.Tensor, device: torch.device, is_parameter: bool) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if is_parameter:
        tensor.data = tensor.data.to(device)
        return tensor
    return tensor.to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index
