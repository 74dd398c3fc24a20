"""Running planned stages: train_stage trains one PlannedStage (train/preflight.py built and checked it);
train_stages plans, checks and trains stages in order; the one post-training path."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ultralytics.utils import LOGGER

from ..config import ProjectConfig, stage_plan
from ..io import atomic_write_bytes, load_model, save_stock_checkpoint
from ..plan import PlannedStage, StageOutputs
from ..quant.apply import export_ternary, ternarize_
from .guard import StageRun
from .preflight import checkpoint_loads, plan_stages, preflight
from .trainer import PLAN_KEY, TTQTrainer

# trainer events at which a SIGINT / SIGTERM whose exception was swallowed (guard.raise_on_signals) ends the run
SIGNAL_CHECKS = ("on_train_batch_end", "on_train_epoch_end", "on_fit_epoch_end", "on_model_save", "on_val_batch_end")


def train_stage(stage: PlannedStage, callbacks: dict | None = None, keep_start: bool = True,
                start_flag: str = "--start") -> dict:
    """Train one planned stage (resuming its last.pt when planned so). Returns the output paths and final metrics.

    The stage folder is locked for the run (guard.StageLock); SIGINT / SIGTERM end it with one line saying what
    was saved and how to resume (the command's own start flag, `start_flag`, kept in it with `keep_start`); a run
    that fails before saving a checkpoint removes the folder it created."""
    run = StageRun(stage.outputs.dir, stage.number, keep_start, start_flag)
    run.resumed = stage.resumed
    with run.guard():
        if stage.resumed and stage.resumed[1] and stage.resumed[0] >= stage.resumed[1]:
            return {**stage.outputs.as_dict(), "metrics": {}, "completed": complete_stage(stage.outputs)}
        trainer = TTQTrainer(overrides=stage.trainer_overrides(PLAN_KEY))
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        for event in SIGNAL_CHECKS:
            trainer.add_callback(event, run.check_signals)
        trainer.train()
    return {**stage.outputs.as_dict(), "metrics": dict(trainer.metrics or {})}


def complete_stage(outputs: StageOutputs) -> list[str]:
    """A stage whose epochs all ran but whose run ended before best.pt or its ternary export was written (a kill
    during the final saves): write what is missing, without training. best.pt, if it does not load, becomes a copy
    of last.pt (the final epoch, the only result left); ternary.pt is exported from best.pt. Returns the files
    written, each also named in a line."""
    written = []
    if not (outputs.best.is_file() and checkpoint_loads(outputs.best)):
        atomic_write_bytes(outputs.best, outputs.last.read_bytes())
        written.append(str(outputs.best))
        LOGGER.warning(f"{outputs.best} was missing or unreadable: written as a copy of {outputs.last} (final epoch)")
    if not (outputs.ternary.is_file() and checkpoint_loads(outputs.ternary)):
        model, ckpt = load_model(outputs.best)
        save_stock_checkpoint(export_ternary(model), outputs.ternary, train_args=ckpt.get("train_args"),
                              extra={"ternary_source": str(outputs.best)})
        written.append(str(outputs.ternary))
    print(f"stage finished: its epochs had all run; wrote {', '.join(written)} (no training, no final validation)")
    return written


def train_stages(cfg: ProjectConfig, numbers: list[int], start: str | None = None, resume: bool = False,
                 callbacks: dict | None = None, start_flag: str = "--start", accept_changes: bool = False) -> list[dict]:
    """Plan the stages (1-based `numbers`, in order), check them all (preflight), then train each (train_stage).
    `accept_changes`: resume even if the config now differs from the stage's saved one (plan_stages)."""
    planned = plan_stages(cfg, numbers, start, resume, start_flag, accept_changes)
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
