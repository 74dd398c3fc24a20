"""Pack a ternary checkpoint into the packed ternary file (safetensors, no pickle), or unpack one.

  yolo-tq pack CKPT OUT [--rest fp16]       pack (a training checkpoint goes through its stock ternary export),
                                            then read the file back and check the round trip
  yolo-tq pack --unpack FILE --out PT       rebuild the model and save it as an ordinary Ultralytics .pt

Ternary weights: base-3 codes, 5 per byte, with Wp/Wn per layer; other weights INT8 per output channel (FP16 with
--rest fp16); biases and BatchNorm in FP16. The format is described in yolo_tq/formats/packed.py; `yolo-tq size`
reports the sizes against the FP baseline.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .args import add_rest_args, input_file, output_path

    p.add_argument("ckpt", nargs="?", type=input_file, metavar="CKPT", help="ternary checkpoint (.pt) to pack")
    p.add_argument("out", nargs="?", type=output_path, metavar="OUT", help="packed file to write (.safetensors)")
    add_rest_args(p)
    p.add_argument("--unpack", metavar="FILE", type=input_file, help="unpack this packed file instead (needs --out)")
    p.add_argument("--out", dest="unpacked_pt", type=output_path, metavar="PT",
                   help="with --unpack: the Ultralytics .pt to write")


def argument_problem(a: argparse.Namespace) -> str | None:
    """What is wrong with a combination of arguments, if anything."""
    if a.unpack:
        if a.ckpt or a.out or a.rest:
            return "--unpack FILE --out PT takes no CKPT, OUT or --rest"
        return None if a.unpacked_pt else "--unpack FILE needs --out PT"
    if a.unpacked_pt:
        return "--out PT is for --unpack; to pack give CKPT OUT"
    return None if a.ckpt and a.out else "give CKPT OUT (or --unpack FILE --out PT)"


def pack(ckpt: str, out: str, rest: str) -> str:
    """Pack a checkpoint, check the round trip; the line to print."""
    from ..eval.size import round_trip_line, stock_ternary_model
    from ..formats.packed import write_verified
    from ..io import load_model

    model, _ = load_model(ckpt)
    check = write_verified(stock_ternary_model(model), out, rest, source=os.path.basename(ckpt))
    return round_trip_line(out, rest, check)


def run(a: argparse.Namespace) -> int:
    from ..io import check_writable
    from .args import UsageError
    from ..formats.reader import unpack_to_checkpoint

    problem = argument_problem(a)
    if problem:
        raise UsageError(problem)
    check_writable(a.unpacked_pt if a.unpack else a.out, "the unpacked .pt" if a.unpack else "the packed file",
                   inputs=[a.unpack or a.ckpt])
    if a.unpack:
        print(f"unpacked model written to {unpack_to_checkpoint(a.unpack, a.unpacked_pt)}")
    else:
        print(pack(a.ckpt, a.out, a.rest or "int8"))
    return 0
