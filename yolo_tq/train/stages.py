"""Running one stage of a config: where it starts, what it adds, where its outputs go."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn
from ultralytics.utils import LOGGER

from ..config import ConfigError, ProjectConfig, find_stage, stage_dir, stage_plan, stage_train_args
from ..io import CheckpointError, check_model_size, ensure_weights, load_model, save_stock_checkpoint
from ..quant.apply import PlanError, export_ternary, quantized_modules, select_convs, ternarize_
from .guard import StageRun, command_line
from .ramp import RampPlan
from .resolution import FinalPassPlan
from .trainer import TERNARY_EXPORT_NAME, DistillPlan, OptimPlan, TrainPlan, TTQTrainer

# Ultralytics train arguments taken from the config's `train` section
_PASSED_TRAIN_KEYS = ("epochs", "batch", "imgsz", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
                      "warmup_epochs", "warmup_bias_lr", "patience", "device", "workers", "seed", "deterministic",
                      "amp", "val", "plots", "save_period")


def stage_outputs(cfg: ProjectConfig, stage) -> dict:
    d = stage_dir(cfg, stage)
    return {"dir": d, "best": d / "weights" / "best.pt", "last": d / "weights" / "last.pt",
            "ternary": d / TERNARY_EXPORT_NAME}


PROGRESSIVE_CONFIG = "configs/stage1_progressive.yaml"
# The original code's stage folders (its configs' logging.save_dir, best.pt directly inside): stage 3's is '..._final'
ORIGINAL_STAGE_FOLDERS = {"stage1_progressive": 1, "stage1_progressive_middle": 2, "stage1_progressive_final": 3}


def original_stage_output(path: str | Path, checkpoint_dir: str | Path) -> tuple[int, Path] | None:
    """For a path in the original code's layout, <dir>/yolo11<size>/<ORIGINAL_STAGE_FOLDERS key>/{best,last}.pt: the
    stage number and our output of that stage of PROGRESSIVE_CONFIG under `checkpoint_dir`. None for other paths."""
    import re

    from ..config import load_config

    p = Path(path)
    size, number = re.fullmatch(r"yolo11([nslmx])", p.parent.parent.name), ORIGINAL_STAGE_FOLDERS.get(p.parent.name)
    if size is None or number is None or p.name not in ("best.pt", "last.pt"):
        return None
    cfg = load_config(PROGRESSIVE_CONFIG, {"checkpoint_dir": str(checkpoint_dir), "model_size": size.group(1)})
    return number, stage_outputs(cfg, cfg.stages[number - 1])[p.stem]


def _local_path_required(value: str) -> bool:
    """A value that names a local file (has a folder part), as opposed to a bare name Ultralytics resolves."""
    return os.sep in value or value.startswith(".")


def resolve_start(cfg: ProjectConfig, index: int, start: str | None) -> str:
    """The checkpoint a stage starts from: `start` if given, the FP weights for the first stage, else the previous
    stage's best (training) checkpoint, which must exist."""
    if start:
        if not Path(start).is_file():
            raise CheckpointError(f"starting checkpoint not found: {start}")
        return str(start)
    if index == 0:
        w = cfg.base.weights
        if _local_path_required(w) and not Path(w).is_file():
            raise CheckpointError(f"weights not found: {w} (pass --weights PATH, or a bare name such as "
                                  f"yolo11{cfg.model_size}.pt to download it)")
        return ensure_weights(w)
    prev = cfg.stages[index - 1]
    out = stage_outputs(cfg, prev)
    for key in ("best", "last"):
        if out[key].is_file():
            return str(out[key])
    raise CheckpointError(f"stage {index + 1} ({cfg.stages[index].name}) starts from stage {index} "
                          f"({prev.name}), whose output {out['best']} does not exist: train stage {index} first")


def check_start(cfg: ProjectConfig, index: int, start: str) -> None:
    """Readable, right size, holds the earlier stages' ternary layers, and the plan fits the model."""
    if not Path(start).is_file():
        return  # a bare name that Ultralytics downloads; checked once it exists
    model, _ = load_model(start)
    check_model_size(model, cfg.model_size, start)
    stage = cfg.stages[index]
    select_convs(model, stage.layers, stage.include_1x1, stage.detect_head)  # PlanError for a layer it lacks
    have = set(quantized_modules(model))
    need = {path for s in cfg.stages[:index] for path in select_convs(model, s.layers, s.include_1x1, s.detect_head)}
    missing = sorted(need - have)
    if missing and index > 0:
        raise PlanError(f"{start} does not hold the earlier stages' ternary convs ({len(missing)} missing, e.g. "
                        f"{missing[0]}); start stage {index + 1} from stage {index}'s output")


def check_data(data: str) -> None:
    if (data.endswith((".yaml", ".yml")) and _local_path_required(data)) and not Path(data).is_file():
        raise ConfigError(f"data yaml not found: {data}")


def distill_plan(cfg: ProjectConfig, start: str) -> DistillPlan | None:
    """Resolved teacher checkpoint and loss weights, or None when distillation is off."""
    d = cfg.distill
    if not d.enabled:
        if d.reconstruct_steps:
            LOGGER.info(f"distill.reconstruct_steps ({d.reconstruct_steps}) skipped: it needs the teacher, and "
                        f"distillation is off")
        return None
    teacher = {"fp": cfg.base.weights, "start": start}.get(d.teacher, d.teacher)
    if d.teacher == "fp":
        teacher = ensure_weights(teacher)
    if not Path(teacher).is_file():
        raise CheckpointError(f"distillation teacher not found: {teacher} (config distill.teacher)")
    return DistillPlan(str(Path(teacher).resolve()), float(d.cls_weight), float(d.box_weight),
                       float(d.feature_weight), float(d.temperature), int(d.reconstruct_steps), float(d.reconstruct_lr),
                       None if d.reconstruct_imgsz is None else int(d.reconstruct_imgsz))


def train_plan(cfg: ProjectConfig, index: int, start: str) -> TrainPlan:
    """The typed plan the trainer gets for stage `index` (0-based) starting from `start`."""
    stage = cfg.stages[index]
    t = stage_train_args(cfg, stage)
    optim = OptimPlan(float(t["scale_lr"]), float(t["scale_weight_decay"]),
                      None if t.get("latent_lr") is None else float(t["latent_lr"]),
                      None if t.get("latent_weight_decay") is None else float(t["latent_weight_decay"]),
                      float(t["threshold_lr"]))
    try:
        ramp = RampPlan(t["ternary_ramp"], int(t["ternary_ramp_epochs"]), float(t["ternary_ramp_start"]),
                        int(t["ternary_freeze_epochs"]))
    except ValueError as e:
        raise ConfigError(f"stage '{stage.name}': {e}") from e
    if ramp.active and ramp.epochs >= int(t["epochs"]):
        raise ConfigError(f"stage '{stage.name}': ternary_ramp_epochs ({ramp.epochs}) must be below the stage's "
                          f"epochs ({t['epochs']}), so that its last epochs train the fully ternary model")
    final = FinalPassPlan(int(t["final_imgsz"] or 0), int(t["final_epochs"]))
    if final.active and final.epochs >= int(t["epochs"]):
        raise ConfigError(f"stage '{stage.name}': final_epochs ({final.epochs}) must be below the stage's epochs "
                          f"({t['epochs']})")
    return TrainPlan(stage_plan(cfg, stage), optim, distill_plan(cfg, start), ramp, bool(t["bn_frozen_stats"]),
                     str(t["trainable"]), str(t["fitness"]), final)


def trainer_overrides(cfg: ProjectConfig, index: int, start: str) -> dict:
    stage = cfg.stages[index]
    targs = stage_train_args(cfg, stage)
    over = {k: targs[k] for k in _PASSED_TRAIN_KEYS if targs.get(k) is not None}
    over.update(targs.get("ultralytics") or {})
    out = stage_outputs(cfg, stage)
    over.update(model=start, data=cfg.base.data, project=str(out["dir"].parent.resolve()), name=stage.name,
                exist_ok=True, ttq=train_plan(cfg, index, start).to_dict())
    return over


def _readable(path: Path) -> bool:
    try:
        load_model(path)
    except CheckpointError:
        return False
    return True


def check_resumable(cfg: ProjectConfig, index: int) -> tuple[int, int | None]:
    """(epochs the stage's last.pt holds, epochs of the run); one line on why it cannot be resumed otherwise (missing,
    empty, unreadable or damaged, with the best.pt to start again from; or a stage that finished)."""
    out, name = stage_outputs(cfg, cfg.stages[index]), f"stage {index + 1} ({cfg.stages[index].name})"
    try:
        _, ckpt = load_model(out["last"])
    except CheckpointError as e:
        again = (f"; its best.pt is readable, start again from it: {command_line(index + 1, start=str(out['best']))}"
                 if out["best"].is_file() and _readable(out["best"]) else "")
        raise CheckpointError(f"cannot resume {name}: {e}{again}") from e
    epoch, epochs = ckpt.get("epoch", -1), (ckpt.get("train_args") or {}).get("epochs")
    if epoch < 0 or (epochs and epoch + 1 >= epochs):
        raise CheckpointError(f"{name} has finished training ({out['last']} is its final checkpoint): nothing to "
                              f"resume; train it again without --resume, or go on to the next stage")
    return epoch + 1, epochs


def train_stage(cfg: ProjectConfig, stage_key, start: str | None = None, resume: bool = False,
                callbacks: dict | None = None) -> dict:
    """Train one stage (resuming its last.pt if `resume`). Returns the output paths and final metrics.

    The stage folder is locked for the run (guard.StageLock); SIGINT / SIGTERM end it with one line saying what
    was saved and how to resume; a run that fails before saving a checkpoint removes the folder it created."""
    index, stage = find_stage(cfg, stage_key)
    out = stage_outputs(cfg, stage)
    check_data(cfg.base.data)
    run = StageRun(out["dir"], index + 1, start)
    with run.guard():
        if resume:
            run.resumed = check_resumable(cfg, index)
            over = trainer_overrides(cfg, index, str(out["last"]))
            over["resume"] = str(out["last"])
        else:
            start = resolve_start(cfg, index, start)
            check_start(cfg, index, start)
            over = trainer_overrides(cfg, index, start)
        trainer = TTQTrainer(overrides=over)
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        trainer.train()
    return {**{k: str(v) for k, v in out.items()}, "metrics": dict(trainer.metrics or {})}


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
        check_data(cfg.base.data)
        reestimate_on_split(model, cfg.base.data, cfg.quantization.bn_reestimate_images, cfg.train.imgsz, cfg.train.batch)
    return model


def post_training_ternary(cfg: ProjectConfig, stage_indices, start: str, out: str | Path) -> Path:
    """post_training_model, then its stock ternary export saved to `out` (loads with ultralytics.YOLO)."""
    model, ckpt = load_model(start)  # read once: the model, and the train_args the export keeps
    post_training_model(cfg, stage_indices, model)
    return save_stock_checkpoint(export_ternary(model), out, train_args=ckpt.get("train_args"))
