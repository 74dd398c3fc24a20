"""Flags and argument types the commands share (each command module adds its own), and UsageError."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import MODEL_SIZES, imgsz_problem


class UsageError(ValueError):
    """A combination of flags that is not valid: the command's usage and one error line (exit status 2)."""


def imgsz_arg(text: str) -> int:
    """argparse type of --imgsz: a positive multiple of 32 (config.imgsz_problem)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if imgsz_problem(value):
        raise argparse.ArgumentTypeError(imgsz_problem(value))
    return value


def positive_int(text: str) -> int:
    """argparse type of a count that must be >= 1 (a validation batch size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def input_file(text: str) -> str:
    """argparse type of an input file: a folder is refused here; a missing file is reported by its loader."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return text


def add_rest_args(p: argparse.ArgumentParser, dest: str = "rest") -> None:
    """--rest int8|fp16: the precision of the non-ternary weights in a packed file, with the older spellings
    --fp16-rest and --pack-fp16 kept as aliases of --rest fp16."""
    from ..formats.metadata import REST_PRECISIONS

    p.add_argument("--rest", dest=dest, choices=REST_PRECISIONS, default=None,
                   help="non-ternary weights: int8 per output channel (default) or fp16")
    p.add_argument("--fp16-rest", "--pack-fp16", dest=dest, action="store_const", const="fp16",
                   help="the same as --rest fp16")


def add_config_args(p: argparse.ArgumentParser, config_default: str | None) -> None:
    """Flags every training script shares. Each overrides the config value of the same name."""
    p.add_argument("--config", default=config_default, help=f"YAML stage config (default: {config_default})")
    p.add_argument("--model-size", choices=MODEL_SIZES, help="YOLO11 size (config: model_size)")
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
