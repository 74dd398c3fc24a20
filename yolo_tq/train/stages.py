"""Running planned stages: train_stage trains one PlannedStage (train/preflight.py built and checked it);
train_stages plans, checks and trains stages in order; the one post-training path."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..config import ProjectConfig, stage_plan
from ..io import load_model, save_stock_checkpoint
from ..plan import PlannedStage
from ..quant.apply import export_ternary, ternarize_
from .guard import StageRun
from .preflight import plan_stages, preflight
from .trainer import PLAN_KEY, TTQTrainer


def train_stage(stage: PlannedStage, callbacks: dict | None = None, keep_start: bool = True,
                start_flag: str = "--start") -> dict:
    """Train one planned stage (resuming its last.pt when planned so). Returns the output paths and final metrics.

    The stage folder is locked for the run (guard.StageLock); SIGINT / SIGTERM end it with one line saying what
    was saved and how to resume (the command's own start flag, `start_flag`, kept in it with `keep_start`); a run
    that fails before saving a checkpoint removes the folder it created."""
    run = StageRun(stage.outputs.dir, stage.number, keep_start, start_flag)
    run.resumed = stage.resumed
    with run.guard():
        trainer = TTQTrainer(overrides=stage.trainer_overrides(PLAN_KEY))
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        trainer.train()
    return {**stage.outputs.as_dict(), "metrics": dict(trainer.metrics or {})}


def train_stages(cfg: ProjectConfig, numbers: list[int], start: str | None = None, resume: bool = False,
                 callbacks: dict | None = None, start_flag: str = "--start") -> list[dict]:
    """Plan the stages (1-based `numbers`, in order), check them all (preflight), then train each (train_stage)."""
    planned = plan_stages(cfg, numbers, start, resume, start_flag)
    preflight(cfg, planned)
    return [train_stage(s, callbacks, keep_start=k == 0, start_flag=start_flag) for k, s in enumerate(planned)]


def post_training_model(cfg: ProjectConfig, stage_indices, start: str | nn.Module) -> nn.Module:
    """The one post-training path: ternarise the layers of the given stages (0-based indices) of a checkpoint (path or
    model, which is changed in place) without training (Wp/Wn initialised from the weights, as TTQ training starts);
    with `quantization.bn_reestimate_images` > 0, re-estimate BatchNorm statistics on that many train images (at
    `train.imgsz`). Returns the model with its quantized layers (TTQConv2d, BitLinear) installed."""
    from .batchnorm import reestimate_on_split

    model = load_model(start)[0] if isinstance(start, (str, Path)) else start
    model.float()
    ternarize_(model, [stage_plan(cfg, cfg.stages[i]) for i in stage_indices])
    if cfg.quantization.bn_reestimate_images:
        reestimate_on_split(model, cfg.base.data, cfg.quantization.bn_reestimate_images, cfg.train.imgsz, cfg.train.batch)
    return model


def post_training_ternary(cfg: ProjectConfig, stage_indices, start: str, out: str | Path) -> Path:
    """post_training_model, then its stock ternary export saved to `out` (loads with ultralytics.YOLO)."""
    model, ckpt = load_model(start)  # read once: the model, and the train_args the export keeps
    post_training_model(cfg, stage_indices, model)
    return save_stock_checkpoint(export_ternary(model), out, train_args=ckpt.get("train_args"))
