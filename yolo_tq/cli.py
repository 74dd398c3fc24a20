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

from .commands.args import UsageError
from .config import ConfigError
from .io import WRITE_FAULTS, CheckpointError, OutputPathError, RunFailedError, printable
from .quant.apply import PlanError
from .quant.spec import SpecError

USER_ERRORS = (ConfigError, CheckpointError, OutputPathError, PlanError, SpecError, FileNotFoundError)
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
    "fetch": "a checkpoint's local path, downloading an official name (run.sh's first step)",
    "int8-reference": "Ultralytics' own OpenVINO INT8 export of the FP model: bytes and mAP (run.sh)",
    "report": "the run.sh report of a pipeline run folder: summary.md, summary.json, plots",
}


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the same 'error: …' line (exit status 2) as every other user error."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


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
    p.add_argument("--allow-download-script", action="store_true",
                   help="let a data yaml's `download:` script run when its dataset is missing (it is code from a "
                        "file; without this flag it never runs; also: YOLO_TQ_ALLOW_DOWNLOAD_SCRIPT=1)")
    return p


def script(name: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse the flags of command `name` and run it (one-line errors, exit status). Entry of the root scripts."""
    parser = command_parser(name, prog)
    args = parser.parse_args(argv)
    if args.safe_load:
        from .io import set_safe_load

        set_safe_load(True)
    if args.allow_download_script:
        from .config.checks import ALLOW_SCRIPT_ENV

        os.environ[ALLOW_SCRIPT_ENV] = "1"  # the processes this one starts (DDP, workers) inherit it

    def run():
        try:
            return command_module(name).run(args)
        except UsageError as e:  # a combination of flags the parser cannot express: its usage and one error line
            parser.error(str(e))

    run_cli(run)


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
    """A user error as one line, control characters escaped; an OSError names its path(s)."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.strerror or type(e).__name__}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        text = str(e) or (e.strerror if isinstance(e, OSError) else "") or type(e).__name__
    return printable(" ".join(text.split()))


def exit_status(e: BaseException) -> int | None:
    """2 for a user error or a fault of the machine (a full disk: an OSError of WRITE_FAULTS), 1 for a run that
    failed on its own (RunFailedError), None for a bug (its traceback is shown)."""
    if isinstance(e, USER_ERRORS + PATH_ERRORS) or (isinstance(e, OSError) and e.errno in WRITE_FAULTS):
        return 2
    return 1 if isinstance(e, RunFailedError) else None


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; user errors and faults of the machine print one line 'error: …' and exit 2, a run that failed
    (RunFailedError) one line and exit 1; tracebacks only with YOLO_TQ_DEBUG=1."""
    try:
        code = main()
    except Exception as e:  # noqa: BLE001 - sorted by exit_status; anything else is re-raised
        status = exit_status(e)
        if status is None or os.environ.get("YOLO_TQ_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
