"""BatchNorm re-estimation: recompute BN running statistics for the network as it is now (ternary weights included).

Ternarising a conv changes the distribution of its output, and of every layer after it, so the running mean and
variance that BatchNorm learned for the FP weights (or that the EMA averaged over weights that kept changing) no
longer match what the layers see. Re-estimating them needs only images, no labels and no gradients.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], max_images: int | None = None) -> int:
    """Reset every BN layer's running statistics and re-estimate them as the plain average over `batches`
    (momentum None = cumulative mean of the per-batch statistics), with the model in train mode and no gradients.

    Restores each layer's momentum and the model's train/eval mode. Returns the number of images seen; raises
    ValueError when `batches` yields nothing (the statistics would be left reset)."""
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    try:
        model.train()
        for x in batches:
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                x = x[: max_images - seen]
            model(x)
            seen += len(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if seen == 0:
        raise ValueError("BatchNorm re-estimation got no images (empty image source)")
    return seen


def split_image_batches(data: str, split: str = "train", imgsz: int = 640, batch: int = 16, workers: int = 0,
                        stride: int = 32) -> Iterable[torch.Tensor]:
    """Float [0, 1] image batches of one split of an Ultralytics data yaml, letterboxed as validation does
    (rectangular batches, no augmentation). For re-estimation outside a trainer (post-training ternarisation)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from ..config import ConfigError

    info = check_det_dataset(data)
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
