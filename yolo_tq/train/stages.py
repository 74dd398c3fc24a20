"""Running one stage of a config: where it starts, what it adds, where its outputs go."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoints import CheckpointError, check_model_size, ensure_weights, load_model
from ..config import ConfigError, ProjectConfig, find_stage, stage_dir, stage_train_args
from ..quantization.shadow_weight_manager import PlanError, quantized_modules, select_convs
from .shadow_trainer import TERNARY_EXPORT_NAME, ShadowTrainer, make_stage_plan

# Ultralytics train arguments taken from the config's `train` section
_PASSED_TRAIN_KEYS = ("epochs", "batch", "imgsz", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
                      "warmup_epochs", "warmup_bias_lr", "patience", "device", "workers", "seed", "deterministic",
                      "amp", "val", "plots", "save_period")


def stage_outputs(cfg: ProjectConfig, stage) -> dict:
    d = stage_dir(cfg, stage)
    return {"dir": d, "best": d / "weights" / "best.pt", "last": d / "weights" / "last.pt",
            "ternary": d / TERNARY_EXPORT_NAME}


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


def distill_plan(cfg: ProjectConfig, start: str) -> dict | None:
    """Resolved teacher checkpoint and loss weights, or None when distillation is off."""
    d = cfg.distill
    if not d.enabled:
        return None
    teacher = {"fp": cfg.base.weights, "start": start}.get(d.teacher, d.teacher)
    if d.teacher == "fp":
        teacher = ensure_weights(teacher)
    if not Path(teacher).is_file():
        raise CheckpointError(f"distillation teacher not found: {teacher} (config distill.teacher)")
    return {"teacher": str(Path(teacher).resolve()), "cls_weight": d.cls_weight, "box_weight": d.box_weight,
            "feature_weight": d.feature_weight, "temperature": d.temperature}


def trainer_overrides(cfg: ProjectConfig, index: int, start: str) -> dict:
    stage = cfg.stages[index]
    targs = stage_train_args(cfg, stage)
    over = {k: targs[k] for k in _PASSED_TRAIN_KEYS if targs.get(k) is not None}
    over.update(targs.get("ultralytics") or {})
    out = stage_outputs(cfg, stage)
    over.update(model=start, data=cfg.base.data, project=str(out["dir"].parent.resolve()), name=stage.name,
                exist_ok=True, ttq=make_stage_plan(stage, cfg.quantization, targs, distill_plan(cfg, start)))
    return over


def train_stage(cfg: ProjectConfig, stage_key, start: str | None = None, resume: bool = False,
                callbacks: dict | None = None) -> dict:
    """Train one stage (resuming its last.pt if `resume`). Returns the output paths and final metrics."""
    index, stage = find_stage(cfg, stage_key)
    out = stage_outputs(cfg, stage)
    check_data(cfg.base.data)
    if resume:
        if not out["last"].is_file():
            raise CheckpointError(f"nothing to resume: {out['last']} does not exist")
        over = trainer_overrides(cfg, index, str(out["last"]))
        over["resume"] = str(out["last"])
    else:
        start = resolve_start(cfg, index, start)
        check_start(cfg, index, start)
        over = trainer_overrides(cfg, index, start)
    trainer = ShadowTrainer(overrides=over)
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    trainer.train()
    return {**{k: str(v) for k, v in out.items()}, "metrics": dict(trainer.metrics or {})}


def post_training_ternary(cfg: ProjectConfig, stage_indices, start: str, out: str | Path) -> Path:
    """Ternarise the layers of the given stages (0-based indices) of an FP checkpoint without training, and save
    the stock ternary export (Wp/Wn initialised from the weights, as TTQ training starts). With
    `quantization.bn_reestimate_images` > 0, BatchNorm statistics are then re-estimated on that many images of the
    data's train split (at `train.imgsz`)."""
    from ..checkpoints import save_stock_checkpoint
    from ..quantization.shadow_weight_manager import ShadowWeightManager
    from .bn_recalibration import reestimate_on_split
    from .shadow_trainer import install_stage

    model, ckpt = load_model(start)
    model.float()
    for i in stage_indices:
        s = cfg.stages[i]
        install_stage(model, make_stage_plan(s, cfg.quantization, stage_train_args(cfg, s)))
    if cfg.quantization.bn_reestimate_images:
        check_data(cfg.base.data)
        reestimate_on_split(model, cfg.base.data, cfg.quantization.bn_reestimate_images, cfg.train.imgsz, cfg.train.batch)
    return save_stock_checkpoint(ShadowWeightManager(model).export_ternary(), out, train_args=ckpt.get("train_args"))
