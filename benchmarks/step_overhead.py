#!/usr/bin/env python
"""Training-step overhead of TTQ: median time of one Ultralytics-style training step (forward + loss + backward +
gradient clipping + optimizer step + EMA update) with TTQ on the stage 1-3 layers, over the same step of the plain
model, on the same real batch, interleaved in one process. Target: <= 1.15x.

  python benchmarks/step_overhead.py --out benchmarks/results/step_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from common import REPO, parser, provenance, require  # first: it sets YOLO_OFFLINE before Ultralytics loads

import torch
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils.torch_utils import ModelEMA

from yolo_tq.config import load_config, stage_plan
from yolo_tq.io import load_model, write_json
from yolo_tq.quant.apply import quantized_modules, ternarize_

TARGET = 1.15


def parse_args() -> argparse.Namespace:
    p = parser(__doc__, "weights", "data", "config", "imgsz", "batch")
    p.add_argument("--steps", type=int, default=15, help="timed steps per model (after 2 warm-up steps each)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step_overhead.json"))
    return p.parse_args()


def real_batch(data, args) -> dict:
    """The first training batch of the data's train split (no mosaic), images scaled to [0, 1]."""
    d = check_det_dataset(str(data))
    ds = build_yolo_dataset(args, d["train"], args.batch, d, mode="train")
    batch = next(iter(build_dataloader(ds, args.batch, 0, shuffle=False)))
    batch["img"] = batch["img"].float() / 255
    return batch


def trainable(model, args):
    """(model in train mode with every parameter trainable, its Adam optimizer, its EMA)."""
    model.args = args
    model.train()
    for prm in model.parameters():
        prm.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    return model, opt, ModelEMA(model)


def step(run, batch) -> float:
    """Seconds of one training step: forward + loss, backward, clipping, optimizer step, EMA update."""
    model, opt, ema = run
    t0 = time.perf_counter()
    loss, _ = model(batch)
    loss.sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    opt.step()
    opt.zero_grad()
    ema.update(model)
    return time.perf_counter() - t0


def timed_steps(runs: dict, batch, steps: int) -> dict[str, list[float]]:
    """Two warm-up steps each, then `steps` timed steps each, alternating which model goes first."""
    for _ in range(2):
        step(runs["plain"], batch), step(runs["ttq"], batch)
    times = {"plain": [], "ttq": []}
    for i in range(steps):
        order = ("plain", "ttq") if i % 2 == 0 else ("ttq", "plain")
        for name in order:
            times[name].append(step(runs[name], batch))
    return times


def main() -> None:
    a = parse_args()
    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    cfg = load_config(a.config)
    torch.manual_seed(0)

    base, _ = load_model(weights)
    plain = copy.deepcopy(base)
    ttq = copy.deepcopy(base)
    ternarize_(ttq, [stage_plan(cfg, s) for s in cfg.stages])  # every stage of the config, as it specifies
    convs = len(quantized_modules(ttq))

    args = get_cfg(overrides={"imgsz": a.imgsz, "batch": a.batch, "mosaic": 0.0})
    batch = real_batch(data, args)
    runs = {"plain": trainable(plain, args), "ttq": trainable(ttq, args)}
    times = timed_steps(runs, batch, a.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ttq"] / med["plain"]
    result = {"benchmark": "step_overhead", "provenance": provenance(), "imgsz": a.imgsz, "batch": a.batch,
              "steps": a.steps, "threads": torch.get_num_threads(), "ternary_convs": convs,
              "median_s": med, "times_s": times, "ratio": ratio, "target": TARGET, "pass": ratio <= TARGET}
    write_json(result, a.out)
    print(f"plain step median {med['plain']:.3f} s, TTQ (stages 1-3, {convs} convs) "
          f"{med['ttq']:.3f} s, ratio {ratio:.3f}x (target <= {TARGET}x)")


if __name__ == "__main__":
    main()
