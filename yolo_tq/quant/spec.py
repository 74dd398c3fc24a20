"""QuantSpec: how one layer is quantized. Frozen, typed, and the only place its defaults are written.

The spec flows unchanged from the config to the module that holds it (`module.spec`). It crosses process
boundaries (Ultralytics' DDP re-launch, resume) as `spec.to_dict()` and comes back as `QuantSpec.from_dict(d)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .ternary import SCALE_GRAD_MODES, THRESHOLD_RULES

KINDS = ("ttq", "bitlinear_ttq", "bitlinear_standard", "int")
BITLINEAR_KINDS = ("bitlinear_ttq", "bitlinear_standard")
INT_BITS = (2, 8)  # the integer kind's bit widths, inclusive
# A sane threshold factor per rule: mean|w|-based factors above 3 zero out (almost) every weight of a conv
# (|w| rarely exceeds 3·mean|w| for more than a few weights); a max|w|-based factor must stay below 1.
THRESHOLD_RANGES = {"mean": (0.0, 3.0), "max": (0.0, 1.0)}


class SpecError(ValueError):
    """A quantization setting that is not valid; the message names it and the valid values."""


@dataclass(frozen=True)
class QuantSpec:
    """What a chosen conv becomes.

    kind: ttq (TTQConv2d) | bitlinear_ttq (BitLinear_TTQ) | bitlinear_standard (BitLinear, absmean scale) |
    int (IntConv2d: LSQ integer weights of `bits` bits, a learned step per output channel).
    threshold, rule: Δ = threshold·mean|w| (rule 'mean') or threshold·max|w| (rule 'max', the paper's).
    scale_grad: 'paper' (summed gradients of Wp/Wn) or 'normalized'. per_channel: Wp/Wn per output channel.
    learn_threshold: the factor t of Δ is a learned parameter per layer, starting at `threshold` (beyond the paper).
    threshold_per_channel: Δ = t·mean|w| over each output channel instead of the whole layer (TTQ kind only).
    act_bits, act_per_token, restore_token_stats: the BitLinear activation path (bitlinear kinds only).
    bits: the integer kind's weight bits (2..8); the other kinds ignore it.
    """

    kind: str = "ttq"
    threshold: float = 0.7
    rule: str = "mean"
    scale_grad: str = "paper"
    per_channel: bool = False
    act_bits: int = 8
    act_per_token: bool = True
    restore_token_stats: bool = True
    learn_threshold: bool = False
    threshold_per_channel: bool = False
    bits: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpecError(f"unknown quantization kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.rule not in THRESHOLD_RULES:
            raise SpecError(f"unknown threshold rule {self.rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
        if self.scale_grad not in SCALE_GRAD_MODES:
            raise SpecError(f"unknown scale_grad {self.scale_grad!r}; valid: {', '.join(SCALE_GRAD_MODES)}")
        low, high = THRESHOLD_RANGES[self.rule]
        if not (isinstance(self.threshold, (int, float)) and low <= self.threshold < high):
            raise SpecError(f"threshold {self.threshold!r} is outside [{low}, {high}) for rule '{self.rule}' "
                            f"(beyond it almost every weight is zero)")
        if not 2 <= int(self.act_bits) <= 16:
            raise SpecError(f"act_bits must be in [2, 16], got {self.act_bits}")
        if self.kind == "bitlinear_standard" and self.learn_threshold:
            raise SpecError("learn_threshold is for the TTQ kinds only (standard BitLinear has no threshold)")
        if self.kind != "ttq" and self.threshold_per_channel:
            raise SpecError("threshold_per_channel is for kind 'ttq' only (a BitLinear layer has one threshold)")
        if self.kind == "int" and not (type(self.bits) is int and INT_BITS[0] <= self.bits <= INT_BITS[1]):
            raise SpecError(f"bits must be an integer in {INT_BITS[0]}..{INT_BITS[1]} for kind 'int', got {self.bits!r}")
        if self.kind == "int" and (self.learn_threshold or self.threshold_per_channel):
            raise SpecError("learn_threshold and threshold_per_channel are for the TTQ kinds (integer weights have a "
                            "learned step, no threshold)")
        if self.kind == "bitlinear_ttq" and self.per_channel:
            raise SpecError("per_channel scales are for kind 'ttq' only (BitLinear_TTQ has one Ap/An per layer)")

    @property
    def is_bitlinear(self) -> bool:
        return self.kind in BITLINEAR_KINDS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpecError(f"unknown QuantSpec fields {sorted(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

