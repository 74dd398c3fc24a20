"""Rewrite a training checkpoint of this package for the pre-package code (commit 03b35d0, its `src/` package), so
that both code versions can train the same start: each TTQConv2d becomes that code's TTQConv2d with the same latent
weight, bias, Wp/Wn and threshold (the ternary weights are checked equal), then it is saved as that code saves.

Run with the old tree first on the import path (it is not part of this package):
  git worktree add /tmp/old03 03b35d0
  PYTHONPATH=/tmp/old03 python benchmarks/convert_for_old_code.py STAGE3_BEST.pt /tmp/s3_old.pt
then, in /tmp/old03: python benchmarks/c2psa_retention.py --variants s3_ttq --stage3 /tmp/s3_old.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn


def convert(model: nn.Module) -> int:
    """Swap every TTQConv2d of `model` for the old code's; returns how many."""
    from src.quantization.ttq_conv import TTQConv2d as OldTTQConv2d

    from yolo_tq.quant.layers import TTQConv2d

    n = 0
    for path, m in list(model.named_modules()):
        if not isinstance(m, TTQConv2d):
            continue
        q = m.quantizer
        if getattr(q, "threshold_per_channel", False) or q.threshold_factor.requires_grad:
            raise SystemExit(f"{path}: per-channel or learned thresholds do not exist in the old code")
        shape = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          bias=m.bias is not None)
        old = OldTTQConv2d(shape, float(q.threshold_factor), q.rule, q.scale_grad, q.wp.dim() > 0)
        with torch.no_grad():
            old.latent_weight.copy_(m.latent_weight)
            if m.bias is not None:
                old.bias.copy_(m.bias)
            old.wp.data, old.wn.data = q.wp.detach().clone(), q.wn.detach().clone()
        if not torch.equal(old.weight, m.weight):
            raise SystemExit(f"{path}: the old layer's ternary weight differs")
        parent, name = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, old)
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint written by this package (best.pt / last.pt)")
    p.add_argument("out", help="where to write the old code's checkpoint")
    a = p.parse_args()
    from src.checkpoints import save_stock_checkpoint

    from yolo_tq.io import load_model

    model, ckpt = load_model(a.checkpoint)
    n = convert(model)
    save_stock_checkpoint(model, a.out, train_args=ckpt.get("train_args"))
    print(f"{n} TTQ layers converted; written {a.out}")


if __name__ == "__main__":
    main()
