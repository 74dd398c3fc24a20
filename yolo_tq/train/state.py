"""Training state in Ultralytics' metrics: what the ternary layers do, epoch by epoch.

After every epoch TTQTrainer adds, for the quantized layers of the model being trained (the weights the optimizer
steps, not their EMA copy):
- `ttq/<group>/wp_mean`, `wp_min`, `wp_max` and the same for `wn`: the learned scales of every TTQWeight quantizer,
  Wp/Wn of TTQConv2d and Ap/An of BitLinear_TTQ, over every scale value of the group (one per layer, one per output
  channel with per-channel scales). Wn is the stored magnitude (the negative ternary value is −Wn).
- `ttq/<group>/zeros`: the share of zeros in the group's ternary codes.
- `ttq/<group>/flips`: the share of latent weights whose ternary code (−1/0/+1) differs from the previous epoch's.
  The first epoch of a run (a resumed one too) compares with the weights the run started from, so it is always
  defined; after a NaN recovery (Ultralytics redoes the epoch) the discarded epoch is skipped.
Codes are those of the fully ternary weight (what an export stores, whatever a ternary ramp's share is): from the
threshold Δ for TTQWeight, from BitNet's round(w/β) for BitLinear_Standard (which has no learned scales, so only
zeros and flips). Packed layers (fixed weights) are left out.

Groups: `current`, the layers the stage being trained selects (its convs, and its C2PSA layers), and `earlier`, every
other quantized layer (installed by earlier stages, carried in the starting checkpoint). The layers are found once,
when training starts; a group without layers (or without learned scales) has no keys, so the keys are the same every
epoch of a run. The statistics become the last columns of results.csv and are merged into `trainer.metrics`, which
every logger Ultralytics enables (TensorBoard, W&B, MLflow, ...) reads in on_fit_epoch_end, also with val=False.
One int8 snapshot of the codes is kept, on the model's device, and replaced once per epoch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..quant.apply import quantized_modules
from ..quant.layers import AbsmeanWeight, TTQWeight
from ..quant.ternary import absmean_ternarize, ternary_masks

PREFIX = "ttq"
GROUPS = ("current", "earlier")
CODED = (TTQWeight, AbsmeanWeight)  # quantizers whose fully ternary weight has codes that can change


# ------------------------------------------------------------------------------------------------ pure statistics
@torch.no_grad()
def ternary_codes(module: nn.Module) -> torch.Tensor:
    """int8 codes (−1, 0, +1) of a quantized layer's fully ternary weight (its quantizer is one of CODED)."""
    q, w = module.quantizer, module.latent_weight.detach()
    if isinstance(q, TTQWeight):
        pos, neg = ternary_masks(w, q.delta(w).detach())
        return pos.to(torch.int8) - neg.to(torch.int8)
    if isinstance(q, AbsmeanWeight):
        return torch.sign(absmean_ternarize(w)).to(torch.int8)
    raise TypeError(f"{type(q).__name__} has no ternary codes")


def zero_share(codes: Sequence[torch.Tensor]) -> float:
    """Share of zero entries over all the code tensors together."""
    return float(sum(int((c == 0).sum()) for c in codes) / sum(c.numel() for c in codes))


def flip_share(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """Share of entries, over all the code tensors together, whose code differs between `before` and `after`."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} code tensors before, {len(after)} after")
    return float(sum(int((b != a).sum()) for b, a in zip(before, after)) / sum(a.numel() for a in after))


def value_summary(tensors: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(mean, min, max) over every value of the tensors together (a scalar counts once, a vector per entry)."""
    v = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    return float(v.mean()), float(v.min()), float(v.max())


# ---------------------------------------------------------------------------------------------------- the tracker
class TrainingState:
    """The quantized layers of a model in named groups, with their codes at the last call; `epoch_stats()` gives
    this epoch's statistics (module docstring) and takes the new snapshot."""

    def __init__(self, groups: dict[str, Sequence[nn.Module]]):
        self.scaled = {g: [m.quantizer for m in ms if isinstance(m.quantizer, TTQWeight)] for g, ms in groups.items()}
        self.coded = {g: [m for m in ms if isinstance(m.quantizer, CODED)] for g, ms in groups.items()}
        self.codes = self.snapshot()

    def snapshot(self) -> dict[str, list[torch.Tensor]]:
        return {g: [ternary_codes(m) for m in ms] for g, ms in self.coded.items()}

    @torch.no_grad()
    def epoch_stats(self) -> dict[str, float]:
        codes, out = self.snapshot(), {}
        for g, quantizers in self.scaled.items():
            for attr in ("wp", "wn") if quantizers else ():
                mean, low, high = value_summary([getattr(q, attr) for q in quantizers])
                out.update({f"{PREFIX}/{g}/{attr}_mean": mean, f"{PREFIX}/{g}/{attr}_min": low,
                            f"{PREFIX}/{g}/{attr}_max": high})
            if codes[g]:
                out[f"{PREFIX}/{g}/zeros"] = zero_share(codes[g])
                out[f"{PREFIX}/{g}/flips"] = flip_share(self.codes[g], codes[g])
        self.codes = codes
        return out


# ------------------------------------------------------------------------------------------- trainer integration
def find_state_layers(trainer) -> None:
    """on_pretrain_routine_end (weights loaded, a resume's too): group the model's quantized layers into `current`
    (the stage's paths, trainer.stage_paths) and `earlier`, and take the first code snapshot. Rank 0 only (it logs)."""
    if RANK not in {-1, 0}:
        return
    model, current = unwrap_model(trainer.model), set(trainer.stage_paths)
    groups: dict[str, list] = {g: [] for g in GROUPS}
    for path, m in quantized_modules(model).items():
        groups[GROUPS[0] if path in current else GROUPS[1]].append(m)
    trainer.training_state = TrainingState({g: ms for g, ms in groups.items() if ms})


def with_training_state(trainer, metrics: dict) -> dict:
    """The results.csv row `metrics` with this epoch's statistics as its last columns (the same order every epoch,
    whatever trainer.metrics held before); trainer.metrics gets them too, for the loggers' on_fit_epoch_end."""
    state = getattr(trainer, "training_state", None)
    if state is None:
        return metrics
    stats = state.epoch_stats()
    if trainer.metrics is not None:
        trainer.metrics.update(stats)
    return {**{k: v for k, v in metrics.items() if k not in stats}, **stats}
