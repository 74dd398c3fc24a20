"""Flags and argument types the commands share (each command module adds its own), and UsageError."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from ..config import MODEL_SIZES, imgsz_problem
from ..io import input_problem, special_file_kind


PROGRESSIVE_CONFIG = "configs/stage1_progressive.yaml"
# The original code's stage folders (its configs' logging.save_dir, best.pt directly inside): stage 3's is '..._final'
ORIGINAL_STAGE_FOLDERS = {"stage1_progressive": 1, "stage1_progressive_middle": 2, "stage1_progressive_final": 3}


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
    """argparse type of a count that must be >= 1 (a validation batch size, images to check)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type of a count that may be 0 (warm-up runs)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def number_in(low: float, high: float = math.inf, low_open: bool = False):
    """argparse type of a finite number in [low, high] ((low, high] with `low_open`); NaN is refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low < value if low_open else low <= value) or not value <= high or not math.isfinite(value):
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {'in ' if math.isfinite(high) else ''}{span}, "
                                             f"got {text!r}")
        return value

    return parse


def output_path(text: str) -> str:
    """argparse type of a file or folder to write: not empty (where it may go is checked by io.check_writable
    before any work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file name")
    return text


def data_path(text: str) -> str:
    """argparse type of a file to read that may also be a name Ultralytics resolves (a data yaml, official
    weights): an existing device or pipe is refused (reading /dev/zero never ends, a pipe blocks)."""
    kind = special_file_kind(text)
    if kind:
        raise argparse.ArgumentTypeError(f"{text} is {kind}, not a regular file")
    return text


# The original code's result files (its README's commands read them): saved_models/yolo11<size>/<name>.pt, which
# run.sh writes as links to its stage outputs; name -> the stage folder of ours that holds it (ternary.pt)
ORIGINAL_RESULTS = {"stage1": "stage1", "stage1-2": "stage2", "stage1-3": "stage3",
                    "stage1-3+bitlinear_ttq": "c2psa_bitlinear_ttq", "stage1-3+bitlinear_standard": "c2psa_bitlinear_standard"}
DEFAULT_CHECKPOINT_DIR = "checkpoints"  # config base.checkpoint_dir's default, where train.py writes


def original_result(path: str | Path, checkpoint_dir: str | Path = DEFAULT_CHECKPOINT_DIR) -> Path | None:
    """For saved_models/yolo11<size>/<ORIGINAL_RESULTS key>.pt: our file holding that model (the stage's ternary
    export under `checkpoint_dir`), else None."""
    p = Path(path)
    size = re.fullmatch(rf"yolo11([{''.join(MODEL_SIZES)}])", p.parent.name)
    if p.parent.parent.name != "saved_models" or size is None or p.suffix != ".pt" or p.stem not in ORIGINAL_RESULTS:
        return None
    return Path(checkpoint_dir) / p.parent.name / ORIGINAL_RESULTS[p.stem] / "ternary.pt"


def original_stage_output(path: str | Path, checkpoint_dir: str | Path) -> tuple[int, Path] | None:
    """For a path in the original code's training layout, <dir>/yolo11<size>/<ORIGINAL_STAGE_FOLDERS key>/{best,
    last}.pt: the stage number and our output of that stage of PROGRESSIVE_CONFIG under `checkpoint_dir`."""
    from ..config import load_config, stage_outputs

    p = Path(path)
    size = re.fullmatch(rf"yolo11([{''.join(MODEL_SIZES)}])", p.parent.parent.name)
    number = ORIGINAL_STAGE_FOLDERS.get(p.parent.name)
    if size is None or number is None or p.name not in ("best.pt", "last.pt"):
        return None
    cfg = load_config(PROGRESSIVE_CONFIG, {"checkpoint_dir": str(checkpoint_dir), "model_size": size.group(1)})
    outputs = stage_outputs(cfg, cfg.stages[number - 1])
    return number, outputs.best if p.stem == "best" else outputs.last


def input_file(text: str) -> str:
    """argparse type of an input file: a folder is refused here; a missing file is reported by its loader. A missing
    path of the original code's (saved_models/..., ttq_checkpoints/...) is read as our file that holds it, with a
    note; when ours is missing too, one line names it and the command that writes it."""
    problem = input_problem(text)
    if problem and problem != "not found":  # a folder, a device, a pipe
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    if Path(text).exists():
        return text
    saved, stage = original_result(text), original_stage_output(text, DEFAULT_CHECKPOINT_DIR)
    ours = saved if saved is not None else stage[1] if stage is not None else None
    if ours is None:
        return text
    if not ours.is_file():
        raise argparse.ArgumentTypeError(
            f"{text} not found: the original code's path for what this project writes to {ours} (train.py, "
            f"train_c2psa.py) and bash run.sh links as saved_models/; run bash run.sh, or the training commands")
    print(f"note: original path {text} -> {ours}")
    return str(ours)


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
    p.add_argument("--config", type=data_path, default=config_default,
                   help=f"YAML stage config (default: {config_default})")
    p.add_argument("--model-size", choices=MODEL_SIZES, help="YOLO11 size (config: model_size)")
    p.add_argument("--weights", type=data_path,
                   help="starting FP checkpoint (config: base.weights; a bare name is downloaded)")
    p.add_argument("--data", type=data_path, help="Ultralytics data yaml, name or path (config: base.data)")
    p.add_argument("--checkpoint-dir", type=output_path, help="output root (config: base.checkpoint_dir)")
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


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume, and --accept-changes for a config that differs from the one the stage's last.pt was trained with."""
    p.add_argument("--resume", action="store_true", help="resume the stage from its last.pt (in the stage folder "
                   "the config names; refused, naming the keys, if the config now differs from the saved one)")
    p.add_argument("--accept-changes", action="store_true",
                   help="with --resume: resume even if the config changed, with the settings saved in last.pt")
