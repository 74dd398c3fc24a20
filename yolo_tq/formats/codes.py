"""The codes every low-bit file of this project stores, as pure functions: ternary weights as base-3 codes, 5 per byte
(1.6 bits each; 0 -> 0, 1 -> +Wp, 2 -> -Wn), integer-grid weights (LSQ) as 2- or 4-bit codes times a step per output
channel, other weights as INT8 per output channel, BatchNorm as an affine pair. The packed file (packed.py,
reader.py) and the deployable ONNX (deploy_onnx.py) both use them."""

from __future__ import annotations

import math

import torch

from ..io import CheckpointError

TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
_POW3 = torch.tensor([3**i for i in range(TRITS_PER_BYTE)], dtype=torch.int16)


class PackError(CheckpointError):
    """A model that cannot be packed, or a packed file that is corrupt, truncated or inconsistent."""


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes in {0, 1, 2} -> uint8 bytes, 5 codes per byte (base 3, first code least significant)."""
    c = codes.reshape(-1).to(torch.int16)
    if c.numel() and (c.min() < 0 or c.max() > 2):
        raise ValueError("ternary codes must be 0, 1 or 2")
    c = torch.cat([c, c.new_zeros((-c.numel()) % TRITS_PER_BYTE)]).view(-1, TRITS_PER_BYTE)
    return (c * _POW3).sum(1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes from pack_trits -> the first `n` codes (uint8 in {0, 1, 2})."""
    p = packed.reshape(-1).to(torch.int16)
    if p.numel() != packed_trit_bytes(n):
        raise PackError(f"{p.numel()} code bytes cannot hold exactly {n} ternary codes")
    if p.numel() and p.max() > 3**TRITS_PER_BYTE - 1:
        raise PackError(f"byte value {int(p.max())} is not a base-3 code (corrupt file)")
    digits = (p.unsqueeze(1) // _POW3) % 3
    return digits.reshape(-1)[:n].to(torch.uint8)


def packed_trit_bytes(n: int) -> int:
    return math.ceil(n / TRITS_PER_BYTE)


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(codes, Wp, Wn) of a tensor holding only {-Wn, 0, +Wp}: 0 -> 0, +Wp -> 1, -Wn -> 2."""
    w = w.detach().float().reshape(-1)
    wp = float(w.max().clamp_min(0)) if w.numel() else 0.0
    wn = float((-w.min()).clamp_min(0)) if w.numel() else 0.0
    codes = torch.zeros_like(w, dtype=torch.uint8)
    codes[w > 0] = 1
    codes[w < 0] = 2
    if not torch.equal(decode_ternary(codes, wp, wn, w.shape), w):
        raise ValueError("tensor is not ternary (more than one positive or one negative value)")
    return codes, wp, wn


def decode_ternary(codes: torch.Tensor, wp: float, wn: float, shape) -> torch.Tensor:
    """Float32 tensor {0, +Wp, -Wn} from codes {0, 1, 2}."""
    table = torch.tensor([0.0, wp, -wn], dtype=torch.float32)
    return table[codes.long()].reshape(tuple(shape))


GRID_BITS = (2, 4)  # widths integer-grid codes are stored at (3-bit codes at 4); wider grids take the INT8 path
# |w/step - q| allowed for an integer q: float rounding of q·step, after BN fusion, and after the FP16 storage of an
# Ultralytics checkpoint (each value within 2^-11 of q·step, so q within |q|·2^-10 of its integer)
GRID_TOLERANCE, GRID_RELATIVE_TOLERANCE = 1e-3, 2.0**-9
GRID_MAX_REL_ERROR = 2.0**-10  # decoded q·step against the source, relative to the tensor's max|w| (FP16 storage)


def grid_codes(w: torch.Tensor, widths: tuple[int, ...] = GRID_BITS) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(codes, steps, bits) when every output channel of `w` is q·step_c for integers q of a signed b-bit grid
    (-2^(b-1) .. 2^(b-1)-1, b in `widths`), as LSQ weights are, before and after Conv+BN fusion and FP16 storage
    (GRID_TOLERANCE); else None. codes: int8 of w's shape; steps: float32 [C] (0 for an all-zero channel), the
    least-squares step of the codes found; bits: the smallest width that holds every code. The codes of a channel
    come from the largest step, its smallest nonzero |w| over m = 1..2^(b-1), that puts every value on the grid."""
    w2 = w.detach().float().reshape(w.shape[0], -1) if w.dim() else w.detach().float().reshape(1, -1)
    if w2.numel() == 0 or not torch.isfinite(w2).all() or (w2.shape[0] > 1 and grid_codes(w2[:1], widths) is None):
        return None  # (the first channel alone rejects a float tensor cheaply)
    qn = 2 ** (max(widths) - 1)
    smallest = torch.where(w2 != 0, w2.abs(), torch.full_like(w2, math.inf)).amin(1)
    zero = torch.isinf(smallest)
    steps, found = torch.zeros_like(smallest), zero.clone()
    for m in range(1, qn + 1):
        s = (smallest / m).unsqueeze(1)
        q = w2 / torch.where(zero.unsqueeze(1), torch.ones_like(s), s)
        r = q.round()
        near = (q - r).abs() <= GRID_TOLERANCE + GRID_RELATIVE_TOLERANCE * r.abs()
        ok = ~found & near.all(1) & (r >= -qn).all(1) & (r <= qn - 1).all(1)
        steps[ok], found = s.squeeze(1)[ok], found | ok
    if not found.all():
        return None
    codes = torch.round(w2 / torch.where(zero, torch.ones_like(steps), steps).unsqueeze(1))
    q64, w64 = codes.double(), w2.double()
    steps = ((q64 * w64).sum(1) / (q64 * q64).sum(1).clamp_min(1)).float()  # least squares; exact grids keep theirs
    lo, hi = int(codes.min()), int(codes.max())
    bits = next(b for b in sorted(widths) if -(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1)
    return codes.to(torch.int8).reshape(w.shape), steps, bits


def decode_grid(codes: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Float32 weights q·step_c from integer codes (output channel first) and per-channel steps."""
    return (codes.float().reshape(codes.shape[0], -1) * steps.float().unsqueeze(1)).reshape(codes.shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat signed codes of a `bits`-bit grid (-2^(b-1) .. 2^(b-1)-1) -> uint8 bytes, 8/bits codes per byte (offset
    by 2^(b-1), first code in the lowest bits)."""
    if bits not in GRID_BITS:
        raise ValueError(f"grid codes are packed at {GRID_BITS} bits, not {bits}")
    per, off = 8 // bits, 2 ** (bits - 1)
    c = codes.reshape(-1).to(torch.int16) + off
    if c.numel() and (c.min() < 0 or c.max() >= 2 ** bits):
        raise ValueError(f"codes outside the signed {bits}-bit grid")
    c = torch.cat([c, c.new_full(((-c.numel()) % per,), off)]).view(-1, per)
    return (c << (torch.arange(per, dtype=torch.int16) * bits)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 bytes from pack_bits -> the first `n` signed codes (int8)."""
    if bits not in GRID_BITS:
        raise PackError(f"grid codes are stored at {GRID_BITS} bits, not {bits}")
    per = 8 // bits
    p = packed.reshape(-1).to(torch.int16)
    if p.numel() != packed_bit_bytes(n, bits):
        raise PackError(f"{p.numel()} code bytes cannot hold exactly {n} {bits}-bit codes")
    digits = (p.unsqueeze(1) >> (torch.arange(per, dtype=torch.int16) * bits)) & (2 ** bits - 1)
    return (digits.reshape(-1)[:n] - 2 ** (bits - 1)).to(torch.int8)


def packed_bit_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def quantize_int8_per_channel(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: scale_c = max|w_c| / 127 (rounded up to `scale_dtype`, so no code is
    clipped), q = round(w / scale_c) in [-127, 127]. Returns (q int8 of w's shape, scales of `scale_dtype`).
    ValueError if a non-zero scale would overflow or be subnormal in `scale_dtype` (use float32 then)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    amax = w2.abs().amax(1)
    scale = (amax / 127).to(scale_dtype)
    low = scale.float() * 127 < amax
    if low.any():
        scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
    tiny = (amax > 0) & (scale.float() < torch.finfo(scale_dtype).tiny)  # subnormal: the step would be coarse
    if not torch.isfinite(scale).all() or tiny.any():
        raise ValueError(f"a per-channel scale does not fit {scale_dtype}")
    s = scale.float().unsqueeze(1)
    q = torch.round(w2 / torch.where(s > 0, s, torch.ones_like(s))).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights from INT8 codes and per-output-channel scales."""
    return (q.float().reshape(q.shape[0], -1) * scale.float().unsqueeze(1)).reshape(q.shape)


def bn_affine(weight, bias, running_mean, running_var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (eval) as y = x*scale + shift."""
    scale = weight.float() / torch.sqrt(running_var.float() + eps)
    return scale, bias.float() - running_mean.float() * scale


def bn_from_affine(scale, shift, eps: float) -> dict[str, torch.Tensor]:
    """BatchNorm tensors that compute y = x*scale + shift in eval mode."""
    scale, shift = scale.float(), shift.float()
    return {"weight": scale, "bias": shift, "running_mean": torch.zeros_like(scale),
            "running_var": torch.full_like(scale, 1.0 - eps)}
