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

from common import REPO, SHARED_DATA, SHARED_WEIGHTS, provenance, require, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(SHARED_WEIGHTS))
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--config", default=str(REPO / "configs" / "stage1_progressive.yaml"))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=15, help="timed steps per model (after 2 warm-up steps each)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step_overhead.json"))
    a = p.parse_args()

    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils.torch_utils import ModelEMA

    from src.checkpoints import load_model
    from src.config import load_config
    from src.quantization.shadow_weight_manager import LayerPlan, ShadowWeightManager

    weights, data = require(a.weights, "weights"), require(a.data, "data yaml")
    cfg = load_config(a.config)
    torch.manual_seed(0)

    base, _ = load_model(weights)
    plain = copy.deepcopy(base)
    ttq = copy.deepcopy(base)
    mgr = ShadowWeightManager(ttq)
    q = cfg.quantization
    for s in cfg.stages:
        mgr.install(LayerPlan(tuple(s.layers), s.include_1x1, s.threshold, q.threshold_rule, q.scale_grad))

    args = get_cfg(overrides={"imgsz": a.imgsz, "batch": a.batch, "mosaic": 0.0})
    d = check_det_dataset(str(data))
    ds = build_yolo_dataset(args, d["train"], a.batch, d, mode="train")
    batch = next(iter(build_dataloader(ds, a.batch, 0, shuffle=False)))
    batch["img"] = batch["img"].float() / 255

    def make(model):
        model.args = args
        model.train()
        for prm in model.parameters():
            prm.requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        return model, opt, ModelEMA(model)

    runs = {"plain": make(plain), "ttq": make(ttq)}

    def step(name):
        model, opt, ema = runs[name]
        t0 = time.perf_counter()
        loss, _ = model(batch)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        opt.step()
        opt.zero_grad()
        ema.update(model)
        return time.perf_counter() - t0

    for _ in range(2):
        step("plain"), step("ttq")
    times = {"plain": [], "ttq": []}
    for i in range(a.steps):
        order = ("plain", "ttq") if i % 2 == 0 else ("ttq", "plain")
        for name in order:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ttq"] / med["plain"]
    result = {"benchmark": "step_overhead", "provenance": provenance(), "imgsz": a.imgsz, "batch": a.batch,
              "steps": a.steps, "threads": torch.get_num_threads(), "ternary_convs": len(mgr.quantized),
              "median_s": med, "times_s": times, "ratio": ratio, "target": 1.15, "pass": ratio <= 1.15}
    write_json(result, a.out)
    print(f"plain step median {med['plain']:.3f} s, TTQ (stages 1-3, {len(mgr.quantized)} convs) "
          f"{med['ttq']:.3f} s, ratio {ratio:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
