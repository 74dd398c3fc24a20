"""BatchNorm re-estimation: recompute BN running statistics for the network as it is now (ternary weights included).

Ternarising a conv changes the distribution of its output, and of every layer after it, so the running mean and
variance that BatchNorm learned for the FP weights (or that the EMA averaged over weights that kept changing) no
longer match what the layers see. Re-estimating them needs only images, no labels and no gradients.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn


def _limit(batches: Iterable[torch.Tensor], max_images: int | None, seen: list[int]) -> Iterator[torch.Tensor]:
    """Yield batches until `max_images` images went out (the last batch cut to fit); count them in seen[0]."""
    for x in batches:
        if max_images is not None:
            if seen[0] >= max_images:
                return
            x = x[: max_images - seen[0]]
        seen[0] += len(x)
        yield x


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], max_images: int | None = None) -> int:
    """Re-estimate every BN layer's running statistics as the plain average over `batches`, through PyTorch's
    `torch.optim.swa_utils.update_bn` (reset, momentum None, train mode, no gradients; momentum and mode restored).

    Returns the number of images seen; raises ValueError when `batches` yields nothing (the statistics would be
    left reset)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    seen = [0]
    device = next(model.parameters()).device
    update_bn(_limit(batches, max_images, seen), model, device=device)
    if seen[0] == 0:
        raise ValueError("BatchNorm re-estimation got no images (empty image source)")
    return seen[0]


def split_image_batches(data: str, split: str = "train", imgsz: int = 640, batch: int = 16, workers: int = 0,
                        stride: int = 32) -> Iterable[torch.Tensor]:
    """Float [0, 1] image batches of one split of an Ultralytics data yaml, letterboxed as validation does
    (rectangular batches, no augmentation). For re-estimation outside a trainer (post-training ternarisation)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ..config import ConfigError, check_dataset

    info = check_dataset(data, (split,))
    if not info.get(split):
        raise ConfigError(f"{data} has no '{split}' split to re-estimate BatchNorm statistics on")
    cfg = get_cfg(overrides={"imgsz": imgsz, "batch": batch, "workers": workers, "data": data})
    dataset = build_yolo_dataset(cfg, info[split], batch, info, mode="val", rect=True, stride=stride)
    loader = build_dataloader(dataset, batch, workers, shuffle=False, pin_memory=False, device="cpu")
    for b in loader:
        yield b["img"].float() / 255


def reestimate_on_split(model: nn.Module, data: str, images: int, imgsz: int, batch: int = 16,
                        split: str = "train") -> int:
    """Re-estimate `model`'s BN statistics on the first `images` images of `split` of a data yaml."""
    stride = max(int(model.stride.max()), 32)
    return recalibrate_batchnorm(model, split_image_batches(data, split, imgsz, min(batch, images), stride=stride),
                                 max_images=images)
