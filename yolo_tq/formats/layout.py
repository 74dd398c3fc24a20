"""Which entries of a packed file hold which state: the names and suffixes, the layout a model needs
(expected_layout), and its check against what a file holds (check_layout)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .codes import GRID_BITS, PackError, packed_bit_bytes, packed_trit_bytes
from .metadata import short_repr

KIND_SUFFIXES = {"ternary": (".codes", ".scales"), **{f"grid{b}": (f".grid{b}", ".steps") for b in GRID_BITS},
                 "int8": (".int8", ".scale"), "bn": (".bn_scale", ".bn_shift")}
RESERVED_SUFFIXES = tuple(s for pair in KIND_SUFFIXES.values() for s in pair)
Layout = dict  # entry name -> (allowed dtypes, shape) expected, or (dtype, shape) found


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def owner_path(key: str, owners: dict[str, nn.Module]) -> str | None:
    """The path in `owners` that `key` lies under, if any."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in owners), None)


def entry_kinds(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """State key (BatchNorm: module path) -> ternary | grid2 | grid4 | int8 | bn | fp16 | raw, from the names and
    dtypes."""
    kinds = {name[:-len(pair[0])]: kind for name in tensors for kind, pair in KIND_SUFFIXES.items()
             if name.endswith(pair[0])}
    parts = {key + s for key, kind in kinds.items() for s in KIND_SUFFIXES[kind]}
    kinds.update((name, "fp16" if t.dtype == torch.float16 else "raw") for name, t in tensors.items()
                 if name not in parts)
    return kinds


def stored_entries(key: str, target: torch.Tensor, names: set[str]) -> Layout:
    """The entries that hold state key `key` (the model's tensor `target`), with their dtypes and shapes; which
    kind (ternary, INT8, as is) follows from the names the file holds."""
    if f"{key}.codes" in names:
        return {f"{key}.codes": ((torch.uint8,), (packed_trit_bytes(target.numel()),)),
                f"{key}.scales": ((torch.float32,), (2,))}
    for b in GRID_BITS:
        if f"{key}.grid{b}" in names and target.dim() >= 2:
            return {f"{key}.grid{b}": ((torch.uint8,), (packed_bit_bytes(target.numel(), b),)),
                    f"{key}.steps": ((torch.float32,), tuple(target.shape[:1]))}
    if f"{key}.int8" in names and target.dim() >= 2:
        return {f"{key}.int8": ((torch.int8,), tuple(target.shape)),
                f"{key}.scale": ((torch.float16, torch.float32), tuple(target.shape[:1]))}
    return {key: ((torch.float16,) if target.is_floating_point() else (target.dtype,), tuple(target.shape))}


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if p and is_batchnorm(m)}


def stored_key(key: str) -> str:
    """A PackedBitLinear's `latent_weight` is stored as its `weight`."""
    return key[:-len("latent_weight")] + "weight" if key.endswith(".latent_weight") else key


def expected_layout(model: nn.Module, names: set[str]) -> Layout:
    """Every entry a file must hold for `model` (built from the metadata): name -> (dtypes, shape)."""
    bns = batchnorms(model)
    out = {f"{p}.{s}": ((torch.float16,), tuple(bn.running_mean.shape)) for p, bn in bns.items()
           for s in ("bn_scale", "bn_shift")}
    for key, target in model.state_dict().items():
        if owner_path(key, bns) is None:
            out.update(stored_entries(stored_key(key), target, names))
    return out


def check_layout(expected: Layout, found: Layout) -> None:
    """PackError for the first entry missing, of another dtype or shape, or that the model has no place for."""
    for name, (dtypes, shape) in expected.items():
        if name not in found:
            raise PackError(f"tensor '{name}' is missing from the file")
        dtype, got = found[name]
        if dtype not in dtypes:
            raise PackError(f"tensor '{name}' is {dtype}, the format stores it as {' or '.join(map(str, dtypes))}")
        if tuple(got) != tuple(shape):
            raise PackError(f"tensor '{name}' has shape {short_repr(list(got))}, the model built from the yaml needs "
                            f"{list(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise PackError(f"the file holds tensors the model built from its yaml has no place for: {short_repr(extra[:3])}")
