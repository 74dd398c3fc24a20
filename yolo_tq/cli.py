"""Shared command-line plumbing: common flags, config overrides, one-line errors with a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .checkpoints import CheckpointError
from .config import ConfigError
from .quantization.shadow_weight_manager import PlanError

USER_ERRORS = (ConfigError, CheckpointError, PlanError, FileNotFoundError)


def add_config_args(p: argparse.ArgumentParser, config_default: str | None) -> None:
    """Flags every training script shares. Each overrides the config value of the same name."""
    p.add_argument("--config", default=config_default, help=f"YAML stage config (default: {config_default})")
    p.add_argument("--model-size", choices=["n", "s", "m", "l", "x"], help="YOLO11 size (config: model_size)")
    p.add_argument("--weights", help="starting FP checkpoint (config: base.weights; a bare name is downloaded)")
    p.add_argument("--data", help="Ultralytics data yaml, name or path (config: base.data)")
    p.add_argument("--checkpoint-dir", help="output root (config: base.checkpoint_dir)")
    for flag, typ, what in (("--epochs", int, "epochs per stage"), ("--imgsz", int, "image size"),
                            ("--batch", int, "batch size"), ("--workers", int, "dataloader workers"),
                            ("--lr0", float, "initial learning rate"), ("--scale-lr", float, "Wp/Wn learning rate"),
                            ("--patience", int, "early-stopping patience"), ("--seed", int, "random seed")):
        p.add_argument(flag, type=typ, help=f"{what} (config: train.{flag[2:].replace('-', '_')})")
    p.add_argument("--device", help="cpu, 0, 0,1 ... (config: train.device)")
    p.add_argument("--set", dest="dotlist", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config value, e.g. --set quantization.scale_grad=normalized (repeatable)")


def config_overrides(a: argparse.Namespace) -> dict:
    keys = ("model_size", "weights", "data", "checkpoint_dir", "epochs", "imgsz", "batch", "workers", "lr0",
            "scale_lr", "patience", "seed", "device")
    return {k: getattr(a, k, None) for k in keys}


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; user errors print one line 'error: …' and exit 2, tracebacks only with YOLO_TQ_DEBUG=1."""
    try:
        code = main()
    except USER_ERRORS as e:
        if os.environ.get("YOLO_TQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
