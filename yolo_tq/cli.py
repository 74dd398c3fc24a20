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
from typing import Callable

from .config import ConfigError
from .io import CheckpointError
from .quant.apply import PlanError
from .quant.spec import SpecError

USER_ERRORS = (ConfigError, CheckpointError, PlanError, SpecError, FileNotFoundError)
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
}


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
    p = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p


def script(name: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse the flags of command `name` and run it (one-line errors, exit status). Entry of the root scripts."""
    args = command_parser(name, prog).parse_args(argv)
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
