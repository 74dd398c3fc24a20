"""Before anything trains: `plan_stages` builds the plan of every requested stage once, and `preflight` checks all of
it (outputs, device, start checkpoint, layers, teacher, data), so that a bad setting of stage 3 fails before stage 1
trains. Config values (ramp and final-pass limits included) are checked as the plans are built. What runs afterwards
(stages.train_stage) receives a PlannedStage and does no look-ups or checks of its own."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from ultralytics.utils import LOGGER

from ..config import ConfigError, ProjectConfig, check_dataset, check_device, stage_outputs, stage_plan, \
    stage_train_args
from ..io import CheckpointError, check_model_size, check_writable, ensure_weights, load_model
from ..plan import DistillPlan, FinalPassPlan, OptimPlan, PlannedStage, RampPlan, TrainPlan
from ..quant.apply import PlanError, quantized_modules, select_convs
from .guard import command_line
from .trainer import PLAN_KEY

# Ultralytics train arguments taken from the config's `train` section
PASSED_TRAIN_KEYS = ("epochs", "batch", "imgsz", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
                     "warmup_epochs", "warmup_bias_lr", "patience", "device", "workers", "seed", "deterministic",
                     "amp", "val", "plots", "save_period")


def local_path_required(value: str) -> bool:
    """A value that names a local file (has a folder part), as opposed to a bare name Ultralytics resolves."""
    return os.sep in value or value.startswith(".")


def stage_start(cfg: ProjectConfig, index: int, start: str | None) -> str:
    """The checkpoint stage `index` (0-based) starts from: `start` if given, the FP weights for the first stage
    (downloading an official name), else the previous stage's best (training) checkpoint, which must exist."""
    if start:
        if not Path(start).is_file():
            raise CheckpointError(f"starting checkpoint not found: {start}")
        return str(start)
    if index == 0:
        w = cfg.base.weights
        if local_path_required(w) and not Path(w).is_file():
            raise CheckpointError(f"weights not found: {w} (pass --weights PATH, or a bare name such as "
                                  f"yolo11{cfg.model_size}.pt to download it)")
        return ensure_weights(w)
    prev = stage_outputs(cfg, cfg.stages[index - 1])
    for path in (prev.best, prev.last):
        if path.is_file():
            return str(path)
    raise CheckpointError(f"stage {index + 1} ({cfg.stages[index].name}) starts from stage {index} "
                          f"({cfg.stages[index - 1].name}), whose output {prev.best} does not exist: train stage "
                          f"{index} first")


def distill_plan(cfg: ProjectConfig, start: str) -> DistillPlan | None:
    """The teacher fixed as a path (the FP weights, the stage's start, or the configured checkpoint) and the loss
    weights; None when distillation is off."""
    d = cfg.distill
    if not d.enabled:
        if d.reconstruct_steps:
            LOGGER.info(f"distill.reconstruct_steps ({d.reconstruct_steps}) skipped: it needs the teacher, and "
                        f"distillation is off")
        return None
    teacher = {"fp": cfg.base.weights, "start": start}.get(d.teacher, d.teacher)
    if d.teacher == "fp":
        teacher = ensure_weights(teacher)
    return DistillPlan(str(Path(teacher).resolve()), float(d.cls_weight), float(d.box_weight),
                       float(d.feature_weight), float(d.temperature), int(d.reconstruct_steps), float(d.reconstruct_lr),
                       None if d.reconstruct_imgsz is None else int(d.reconstruct_imgsz))


def train_plan(cfg: ProjectConfig, index: int, start: str, t: dict | None = None) -> TrainPlan:
    """The TrainPlan of stage `index` (0-based) starting from `start`, from its train arguments `t`
    (stage_train_args); its ramp and final-pass settings checked against the stage's epochs."""
    stage = cfg.stages[index]
    t = stage_train_args(cfg, stage) if t is None else t
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


def trainer_arguments(cfg: ProjectConfig, index: int, targs: dict) -> dict:
    """Ultralytics' train arguments of stage `index` from its train arguments `targs` (stage_train_args): the
    config's train keys and train.ultralytics, the data, and the output folder (project/name)."""
    stage = cfg.stages[index]
    over = {k: targs[k] for k in PASSED_TRAIN_KEYS if targs.get(k) is not None}
    over.update(targs.get("ultralytics") or {})
    folder = stage_outputs(cfg, stage).dir
    over.update(data=cfg.base.data, project=str(folder.parent.resolve()), name=stage.name, exist_ok=True)
    return over


def checkpoint_loads(path: Path) -> bool:
    """Whether a checkpoint file loads (load_model's checks: not empty, not damaged, finite weights)."""
    try:
        load_model(path)
    except CheckpointError:
        return False
    return True


def stage_finished(outputs) -> bool:
    """A stage counts as finished only when its best.pt and its ternary export both exist and load."""
    return all(path.is_file() and checkpoint_loads(path) for path in (outputs.best, outputs.ternary))


def saved_plan(cfg: ProjectConfig, index: int, start_flag: str = "--start") -> tuple[tuple[int, int | None], dict | None, dict]:
    """For a resume of stage `index`: ((epochs its last.pt holds, epochs of the run), the TrainPlan saved in it, its
    Ultralytics train_args). One line on why it cannot be resumed otherwise (missing, empty, unreadable or damaged,
    with the best.pt to start again from; a stage that finished; a last.pt without a plan). A stage whose epochs all
    ran but whose best.pt or ternary.pt is missing or unreadable is not finished: it comes back with epochs done =
    epochs and no plan, and resuming it writes those files (stages.complete_stage)."""
    out, name = stage_outputs(cfg, cfg.stages[index]), f"stage {index + 1} ({cfg.stages[index].name})"
    try:
        _, ckpt = load_model(out.last)
    except CheckpointError as e:
        again = "" if not (out.best.is_file() and checkpoint_loads(out.best)) else (
            f"; its best.pt is readable, start again from it: "
            f"{command_line(index + 1, start=str(out.best), start_flag=start_flag)}")
        raise CheckpointError(f"cannot resume {name}: {e}{again}") from e
    args = ckpt.get("train_args") or {}
    epoch, epochs = ckpt.get("epoch", -1), args.get("epochs")
    ran_all = epoch < 0 or bool(epochs and epoch + 1 >= epochs)
    if ran_all and stage_finished(out):
        raise CheckpointError(f"{name} has finished training ({out.last} is its final checkpoint): nothing to "
                              f"resume; train it again without --resume, or go on to the next stage")
    if ran_all:  # Ultralytics' final strip keeps only its own train_args: nothing to compare, nothing to train
        return (epochs, epochs), None, args
    if not isinstance(args.get(PLAN_KEY), dict):
        raise CheckpointError(f"cannot resume {name}: {out.last} holds no TTQ plan (not written by this project)")
    return (epoch + 1, epochs), args[PLAN_KEY], args


def _flat(value, prefix: str = "") -> dict:
    """A nested dict as {'a.b': leaf}, tuples as lists, for comparing a saved plan with a new one."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


# train keys a resume may change without changing the run: hardware, and where it reads its data
RESUME_FREE_KEYS = ("device", "workers", "data", "project", "name", "exist_ok")


def resume_changes(cfg: ProjectConfig, index: int, saved: dict, saved_args: dict, targs: dict) -> list[str]:
    """The keys in which the config now differs from the one a stage's last.pt was trained with: its plan (layers,
    threshold, quantization, distillation, optimiser, ...) and its Ultralytics train arguments (imgsz, epochs, ...)."""
    teacher = (saved.get("distill") or {}).get("teacher")  # `teacher: start` names the start, which resume replaces
    fresh = asdict(train_plan(cfg, index, teacher or str(stage_outputs(cfg, cfg.stages[index]).last), targs))
    old, new = _flat(asdict(TrainPlan(**saved))), _flat(fresh)
    changed = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    over = trainer_arguments(cfg, index, targs)
    changed += [k for k, v in over.items() if k not in RESUME_FREE_KEYS and _flat(saved_args.get(k)) != _flat(v)]
    return changed


def resume_arguments(cfg: ProjectConfig, index: int, targs: dict) -> dict:
    """Ultralytics' arguments of a resumed stage: everything else comes from its last.pt. `save_dir` keeps the run
    in this folder (the one resumed from), even when last.pt was written in another and moved or copied here."""
    over = {"data": cfg.base.data, "save_dir": str(stage_outputs(cfg, cfg.stages[index]).dir.resolve())}
    return {**over, **({"device": targs["device"]} if targs.get("device") is not None else {})}


def plan_stages(cfg: ProjectConfig, numbers: list[int], start: str | None = None, resume: bool = False,
                start_flag: str = "--start", accept_changes: bool = False) -> list[PlannedStage]:
    """The plan of every requested stage (1-based `numbers`, consecutive, in training order), built once. The first
    starts from `start` (or its default, stage_start) or, with `resume`, from its last.pt with the plan saved in it
    (so a resumed stage keeps its teacher and every setting; a config that now differs is refused, naming the keys,
    unless `accept_changes`); each later one from the best.pt of the stage before it. `start_flag`: the command's
    start flag, for the line that says how to start again."""
    planned: list[PlannedStage] = []
    for k, number in enumerate(numbers):
        if not 1 <= number <= len(cfg.stages):
            raise ConfigError(f"stage {number} does not exist; this config has stages 1..{len(cfg.stages)}")
        index, resumed = number - 1, None
        outputs, targs = stage_outputs(cfg, cfg.stages[index]), stage_train_args(cfg, cfg.stages[index])
        if k == 0 and resume:
            resumed, saved, saved_args = saved_plan(cfg, index, start_flag)
            if saved is None:  # only its final files are missing (stages.complete_stage): nothing is trained
                planned.append(PlannedStage(number, outputs, str(outputs.last), resumed, {},
                                            train_plan(cfg, index, str(outputs.last), targs)))
                continue
            changes = resume_changes(cfg, index, saved, saved_args, targs)
            if changes and not accept_changes:
                raise ConfigError(f"cannot resume stage {number} ({cfg.stages[index].name}): the config differs from "
                                  f"the one its last.pt was trained with in {', '.join(changes)}; undo the changes, "
                                  f"train the stage again without --resume, or pass --accept-changes to resume "
                                  f"with the saved settings")
            if changes:
                LOGGER.warning(f"resume keeps the settings saved in {outputs.last}; ignored: {', '.join(changes)}")
            begin, plan, args = str(outputs.last), TrainPlan(**saved), resume_arguments(cfg, index, targs)
        else:
            begin = stage_start(cfg, index, start) if k == 0 else str(planned[-1].outputs.best)
            plan, args = train_plan(cfg, index, begin, targs), trainer_arguments(cfg, index, targs)
        planned.append(PlannedStage(number, outputs, begin, resumed, args, plan))
    return planned


def check_start(cfg: ProjectConfig, first: PlannedStage):
    """The first stage's start checkpoint: readable, of the config's model size, holding the earlier stages' ternary
    layers. Returns its model (None for a bare name Ultralytics downloads when training starts)."""
    if not Path(first.start).is_file():
        return None
    model, _ = load_model(first.start)
    check_model_size(model, cfg.model_size, first.start)
    if first.resumed is None and first.number > 1:
        need = {path for s in cfg.stages[:first.number - 1]
                for path in select_convs(model, s.layers, s.include_1x1, s.detect_head)}
        missing = sorted(need - set(quantized_modules(model)))
        if missing:
            raise PlanError(f"{first.start} does not hold the earlier stages' ternary convs ({len(missing)} missing, "
                            f"e.g. {missing[0]}); start stage {first.number} from stage {first.number - 1}'s output")
    return model


def preflight(cfg: ProjectConfig, planned: list[PlannedStage]) -> None:
    """Everything the planned stages need, in the order a user fixes it, before any of them trains: every output
    folder can be written and every device exists; the start checkpoint fits; every stage's layers exist in the
    model; every teacher exists or is written by an earlier stage of this run; the dataset is usable. Creates
    nothing."""
    for s in planned:
        check_writable(s.outputs.dir, "the stage output folder", folder=True)
        check_device(s.trainer_args.get("device"))
    model = check_start(cfg, planned[0])
    written = set()
    for s in planned:
        if model is not None:
            try:
                select_convs(model, s.plan.stage.layers, s.plan.stage.include_1x1, s.plan.stage.detect_head)
            except PlanError as e:
                raise PlanError(f"stage {s.number} ({s.name}): {e}") from e
        teacher = s.plan.distill.teacher if s.plan.distill else None
        if teacher and not Path(teacher).is_file() and teacher not in written:
            raise CheckpointError(f"stage {s.number} ({s.name}): distillation teacher not found: {teacher} "
                                  f"(config distill.teacher)")
        written.add(str(s.outputs.best.resolve()))
    check_dataset(cfg.base.data, ("train", "val"))
