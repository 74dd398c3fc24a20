"""Fine-tune YOLO11 with BitLinear_TTQ layers in every C2PSA block (one stage, through the project's trainer).

--model is the start checkpoint: a plain YOLO11 checkpoint (C2PSA alone) or any train.py stage output; starting
from the stage-3 output gives the full "stages 1-3 + BitLinear_TTQ" model (its TTQ layers stay ternary). A --model
that does not exist but has the original code's layout, <dir>/yolo11<size>/stage1_progressive{,_middle,_final}/best.pt
(its stages 1, 2, 3; the original run.sh names ttq_checkpoints/yolo11n/stage1_progressive_final/best.pt), is read as
our output of that stage of configs/stage1_progressive.yaml under the config's checkpoint_dir, with a note.

  python train_c2psa.py --config configs/stage2_c2psa.yaml --model checkpoints/yolo11n/stage3/weights/best.pt
  python train_c2psa.py --config configs/stage2_c2psa.yaml --resume
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import PROGRESSIVE_CONFIG, add_config_args, add_resume_args, config_overrides, original_stage_output

DEFAULT_CONFIG = "configs/stage2_c2psa.yaml"
MODE = "bitlinear_ttq"


def add_arguments(p: argparse.ArgumentParser, default_config: str = DEFAULT_CONFIG) -> None:
    add_config_args(p, default_config)
    p.add_argument("--model", help="start checkpoint (default: the config's base.weights)")
    add_resume_args(p)


def start_checkpoint(cfg, model: str | None) -> str | None:
    """--model as given, or, for a missing path in the original code's layout, our output of that stage (a note
    line; one error line naming both paths and the command that makes ours when ours is missing too)."""
    from ..io import CheckpointError

    found = None if not model or Path(model).exists() else original_stage_output(model, cfg.base.checkpoint_dir)
    if found is None:
        return model
    number, ours = found
    if not ours.is_file():
        size = ours.parent.parent.parent.name.removeprefix("yolo11")
        after = {1: "", 2: " (after stage 1)"}.get(number, f" (after stages 1-{number - 1})")
        make = (f"python train.py --config {PROGRESSIVE_CONFIG} --stage {number} --model-size {size} "
                f"--checkpoint-dir {cfg.base.checkpoint_dir}{after}")
        raise CheckpointError(f"start checkpoint not found: {model} (the original code's stage-{number} output), nor "
                              f"our stage-{number} output {ours}; make it with: {make}")
    print(f"note: original path {model} -> {ours} (stage {number} of {PROGRESSIVE_CONFIG})")
    return str(ours)


def run(a: argparse.Namespace, mode: str = MODE) -> int:
    """Train the config's one C2PSA stage, which must replace C2PSA with `mode`."""
    from ..config import ConfigError, dataset_errors, load_config
    from ..train.stages import train_stages

    cfg = load_config(a.config, config_overrides(a), a.dotlist)
    if len(cfg.stages) != 1 or not cfg.stages[0].c2psa:
        raise ConfigError(f"{a.config}: expected one stage with `c2psa: bitlinear_ttq|bitlinear_standard`")
    if cfg.stages[0].c2psa != mode:
        raise ConfigError(f"{a.config} replaces C2PSA with {cfg.stages[0].c2psa}, but this command trains {mode}: "
                          f"use the {'train_c2psa.py' if mode == 'bitlinear_standard' else 'train_c2psa_standard.py'} "
                          f"command for that config, or --set stages[0].c2psa={mode}")
    start = None if a.resume else start_checkpoint(cfg, a.model)
    with dataset_errors(cfg.base.data):
        result, = train_stages(cfg, [1], start, a.resume, start_flag="--model", accept_changes=a.accept_changes)
    print(f"{mode}: training checkpoint {result['best']}, ternary export {result['ternary']}")
    return 0
