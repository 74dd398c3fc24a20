"""The one argument parser: the command registry, shared flags, config overrides, one-line errors.

Every command is a module of `yolo_tq.commands` with a docstring (its --help text), `add_arguments(parser)` and
`run(args) -> int`. `yolo-tq NAME ...` (the console script) and the root scripts (`python train.py ...`, through
`script(NAME)`) parse the same flags and run the same function.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from .config import ConfigError, imgsz_problem
from .io import CheckpointError
from .quant.apply import PlanError
from .quant.spec import SpecError

USER_ERRORS = (ConfigError, CheckpointError, PlanError, SpecError, FileNotFoundError)
# OSErrors that name a path the user gave (an output under a file, a folder without write permission, ...)
PATH_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)
COMMANDS = {  # name -> one-line summary; the module is yolo_tq.commands.<name with - as _>
    "train": "progressive TTQ: train one stage, or all in order (train.py)",
    "c2psa": "BitLinear_TTQ in every C2PSA block (train_c2psa.py)",
    "c2psa-standard": "standard BitLinear in every C2PSA block, the ablation (train_c2psa_standard.py)",
    "val": "mAP of any checkpoint with Ultralytics' validator (validate.py)",
    "layers": "which layers of a checkpoint are ternary, judged from the weights (test.py)",
    "size": "parameters, coverage, theoretical and real sizes, packing (compression_calculation.py)",
    "pack": "pack a ternary checkpoint into the 1.6-bit safetensors file, or --unpack one to a .pt",
    "compare": "FP vs BitLinear_TTQ vs standard BitLinear in one table (compare_bitlinear.py)",
    "latency": "export, agreement check, latency, memory (latency_benchmark.py)",
    "export": "the deployable ONNX: ternary weights as 1.6-bit codes that onnxruntime runs (export.py)",
}


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the same 'error: …' line (exit status 2) as every other user error."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


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


def check_writable(path: str | Path, what: str = "output", folder: bool = False) -> None:
    """Before any work, refuse an output that cannot be written: under a file, a folder where a file goes, or in a
    folder without write permission. `folder`: `path` is a folder to be created. Creates nothing."""
    p = Path(path).absolute()
    if not folder and p.is_dir():
        raise ConfigError(f"cannot write {what} {path}: it is a folder")
    if folder and p.exists() and not p.is_dir():
        raise ConfigError(f"cannot write {what} {path}: it is a file, not a folder")
    parent = p if folder else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} {path}: no permission to write in {parent}")


def check_training(cfg, indices: list[int], start: str | None, resume: bool) -> str | None:
    """Before any training, in the order a user fixes them: every stage's output folder can be written, its device
    exists, the first stage's start checkpoint exists, the dataset is usable. Creates nothing; returns the first
    stage's resolved start (None on resume)."""
    from .config import check_dataset, check_device, stage_dir, stage_train_args
    from .train.stages import resolve_start

    for i in indices:
        check_writable(stage_dir(cfg, cfg.stages[i]), "the stage output folder", folder=True)
        check_device(stage_train_args(cfg, cfg.stages[i]).get("device"))
    first = None if resume else resolve_start(cfg, indices[0], start)
    check_dataset(cfg.base.data, ("train", "val"))
    return first


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


def command_module(name: str):
    return importlib.import_module(f"yolo_tq.commands.{name.replace('-', '_')}")


def command_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command (its module's docstring is the description)."""
    module = command_module(name)
    p = Parser(prog=prog, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.add_argument("--safe-load", action="store_true",
                   help="open .pt files with torch.load(weights_only=True) and an allowlist of torch.nn, Ultralytics "
                        "and yolo_tq classes; anything else is refused (also: YOLO_TQ_SAFE_LOAD=1)")
    return p


def script(name: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse the flags of command `name` and run it (one-line errors, exit status). Entry of the root scripts."""
    args = command_parser(name, prog).parse_args(argv)
    if args.safe_load:
        from .io import set_safe_load

        set_safe_load(True)
    run_cli(lambda: command_module(name).run(args))


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: yolo-tq COMMAND [flags]   (yolo-tq COMMAND --help for its flags)\n\ncommands:\n"
            + "\n".join(f"  {n:<{width}}  {h}" for n, h in COMMANDS.items()))


def main(argv: list[str] | None = None) -> None:
    """The `yolo-tq` console script: yolo-tq COMMAND [flags]."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"error: {'unknown command ' + repr(argv[0]) if argv else 'no command given'}", file=sys.stderr)
        sys.exit(2)
    script(argv[0], argv[1:], prog=f"yolo-tq {argv[0]}")


def error_line(e: BaseException) -> str:
    """A user error as one line; an OSError names its path(s)."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return " ".join(str(e).split())


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; user errors print one line 'error: …' and exit 2, tracebacks only with YOLO_TQ_DEBUG=1."""
    try:
        code = main()
    except USER_ERRORS + PATH_ERRORS as e:
        if os.environ.get("YOLO_TQ_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
