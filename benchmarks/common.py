"""Helpers shared by the benchmark scripts: repo paths, ../shared discovery, shared flags, epoch timing, provenance,
tables. JSON is written with yolo_tq.io.write_json."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "yolo11n.pt"
SHARED_DATA = SHARED / "datasets" / "coco128" / "coco128.yaml"
PROGRESSIVE_CONFIG = REPO / "configs" / "stage1_progressive.yaml"

os.environ.setdefault("YOLO_OFFLINE", "1")

# The retention budget's fixed training settings: one optimizer step per batch (Ultralytics would accumulate to
# nbs=64, i.e. 2 steps per epoch), and validation only after the last epoch of a stage (best.pt = last.pt).
BENCH_SETTINGS = ["train.ultralytics.nbs=16", "train.val=false"]

# Flags several benchmarks share, at the retention budget's defaults (argparse keyword arguments).
FLAGS = {
    "weights": {"default": str(SHARED_WEIGHTS), "help": "FP checkpoint"},
    "data": {"default": str(SHARED_DATA), "help": "Ultralytics data yaml"},
    "config": {"default": str(PROGRESSIVE_CONFIG), "help": "project config"},
    "epochs": {"type": int, "default": 10, "help": "training epochs (per stage)"},
    "imgsz": {"type": int, "default": 320},
    "batch": {"type": int, "default": 16},
    "device": {"default": "cpu", "help": "cpu (the benchmark's budget) or a CUDA device such as 0"},
}


def parser(doc: str, *shared: str, **helps: str) -> argparse.ArgumentParser:
    """An argument parser that shows `doc` as written, with the shared flags named in `shared` (keys of FLAGS);
    `helps` gives a flag its own help text."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in shared:
        p.add_argument(f"--{name}", **{**FLAGS[name], **({"help": helps[name]} if name in helps else {})})
    return p


def epoch_timer() -> tuple[dict, list[float]]:
    """(Ultralytics callbacks that time every training epoch, the list of seconds they fill)."""
    times: list[float] = []
    t0 = {}
    callbacks = {"on_train_epoch_start": lambda tr: t0.__setitem__("t", time.perf_counter()),
                 "on_train_epoch_end": lambda tr: times.append(time.perf_counter() - t0["t"])}
    return callbacks, times


def mean_time(times: list[float]) -> float:
    """Mean of the timed epochs (0 when none was timed)."""
    return sum(times) / max(len(times), 1)


def validate_sizes(checkpoint: str, data: str, sizes: list[int], device: str, project: str | None = None) -> dict:
    """mAP of a checkpoint at each image size (validation batch 16): the first size's mAP50 / mAP50-95 as the row's
    main figures, and `mAP50-95@<size>` for every size."""
    from yolo_tq.eval.validate import validate

    out: dict = {}
    for size in sizes:
        m = validate(checkpoint, data, size, 16, device, project=project)
        if not out:
            out.update({"mAP50": m["mAP50"], "mAP50-95": m["mAP50-95"]})
        out[f"mAP50-95@{size}"] = m["mAP50-95"]
    return out


def require(path: Path | str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        sys.exit(f"error: {what} not found at {p} (pass it with a flag; ../shared provides it in this workplace)")
    return p.resolve()


def provenance() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    import torch
    import ultralytics

    from yolo_tq.machine import cpu_identity, package_versions

    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ultralytics": ultralytics.__version__,
            "packages": package_versions(), "cpu": cpu_identity()}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    widths = [max(len(h), *(len(format(r.get(k, ""), f) if r.get(k) is not None else "-") for r in rows))
              for k, h, f in columns]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        cells = [(format(r[k], f) if r.get(k) is not None else "-") for k, _, f in columns]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
