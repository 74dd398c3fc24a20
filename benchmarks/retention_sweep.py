#!/usr/bin/env python
"""Sweep of training switches on the retention benchmark's stage-1 budget (10 epochs, imgsz 320, 128 images):
runs one `ttq_retention.py --stages 1 --skip-ptq` per variant (several at once with --parallel, e.g. on a GPU),
then prints one table and writes one JSON with every variant's mAP.

  python benchmarks/retention_sweep.py --device 0 --parallel 6 --out benchmarks/results/retention_sweep_gpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, print_table, provenance

from yolo_tq.io import write_json

# Each variant starts from the paper-like settings (no distillation, lr0 for the latent weights) and adds its switches;
# ttq_retention.py itself adds nbs=16 and val=false.
BASE = ["distill.enabled=false", "train.latent_lr=null"]
KD = ["distill.enabled=true"]
KDF = KD + ["distill.feature_weight=1.0"]
VARIANTS = {
    "labels only (lr0 1e-4)": [],
    "labels only, lr0 1e-3": ["train.lr0=0.001", "train.scale_lr=0.001"],
    "KD scores+boxes": KD,
    "KD scores+boxes+features": KDF,
    "KDF + scale_lr 1e-3": KDF + ["train.scale_lr=0.001"],
    "KDF + latent_lr 1e-3": KDF + ["train.latent_lr=0.001"],
    "KDF + latent_lr 1e-3 + scale_lr 1e-3": KDF + ["train.latent_lr=0.001", "train.scale_lr=0.001"],
    "KDF + per-channel scales": KDF + ["quantization.per_channel=true"],
    "KDF + normalized scale grads": KDF + ["quantization.scale_grad=normalized"],
    "KDF + constant lr (lrf 1)": KDF + ["train.lrf=1.0"],
    "KDF + mosaic": KDF + ["train.ultralytics.close_mosaic=0"],
    "KDF + latent_lr 1e-3 + lrf 1": KDF + ["train.latent_lr=0.001", "train.lrf=1.0"],
    "KDF + latent_lr 3e-3": KDF + ["train.latent_lr=0.003"],
    "KDF + latent_lr 3e-3 + lrf 1": KDF + ["train.latent_lr=0.003", "train.lrf=1.0"],
    "KDF + latent_lr 1e-3 + per-channel": KDF + ["train.latent_lr=0.001", "quantization.per_channel=true"],
    "KD + latent_lr 1e-3 + lrf 1": KD + ["train.latent_lr=0.001", "train.lrf=1.0"],
    "labels only + latent_lr 1e-3": ["train.latent_lr=0.001"],
    "KDF x4 weights": ["distill.enabled=true", "distill.cls_weight=4", "distill.box_weight=4",
                       "distill.feature_weight=4"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--parallel", type=int, default=1, help="variants run at once")
    p.add_argument("--only", nargs="*", help="run only these variant names")
    p.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "sweep"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "retention_sweep.json"))
    p.add_argument("extra", nargs="*", help="extra args for ttq_retention.py (after --)")
    a = p.parse_args()
    names = [n for n in VARIANTS if not a.only or n in a.only]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    done: dict[str, dict] = {}
    queue = list(enumerate(names))
    while queue or procs:
        while queue and len(procs) < a.parallel:
            i, name = queue.pop(0)
            out = work / f"v{i:02d}.json"
            cmd = [sys.executable, str(REPO / "benchmarks" / "ttq_retention.py"), "--stages", "1", "--skip-ptq",
                   "--device", a.device, "--workdir", str(work / f"v{i:02d}"), "--out", str(out), "--tag", name,
                   *[x for s in BASE + VARIANTS[name] for x in ("--set", s)], *a.extra]
            log = open(work / f"v{i:02d}.log", "w")
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, time.time())
        for name, (proc, out, t0) in list(procs.items()):
            if proc.poll() is None:
                continue
            del procs[name]
            rows = json.loads(out.read_text())["rows"] if out.is_file() else []
            trained = [r for r in rows if r.get("kind") == "trained"]
            done[name] = {"variant": name, "settings": BASE + VARIANTS[name], "returncode": proc.returncode,
                          "mAP50": trained[0]["mAP50"] if trained else None,
                          "mAP50-95": trained[0]["mAP50-95"] if trained else None,
                          "fp_mAP50-95": rows[0]["mAP50-95"] if rows else None, "wall_s": time.time() - t0}
            print(f"[sweep] {name}: {done[name]['mAP50-95']}", flush=True)
        time.sleep(2)
    rows = [done[n] for n in names]
    write_json({"benchmark": "retention_sweep", "stage": 1, "device": a.device, "provenance": provenance(),
                "rows": rows}, a.out)
    print_table(rows, [("variant", "variant", "s"), ("mAP50", "mAP50", ".4f"), ("mAP50-95", "mAP50-95", ".4f"),
                       ("wall_s", "wall s", ".0f")])


if __name__ == "__main__":
    main()
