"""The one configuration loader: YAML + OmegaConf interpolation, strict key validation, CLI overrides.

Every root script calls `load_config(path, overrides)`; nothing else reads config files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .quant.apply import StagePlan
from .quant.spec import BITLINEAR_KINDS, QuantSpec, SpecError

MODEL_SIZES = ("n", "s", "m", "l", "x")
REPO_ROOT = Path(__file__).resolve().parents[1]
C2PSA_MODES = BITLINEAR_KINDS
MAX_STRIDE = 32  # YOLO11's largest stride: Ultralytics rounds any other image size up to a multiple of it
# Ultralytics arguments this project sets itself for every stage: train.ultralytics must not carry them
PROJECT_SET_ARGS = {"model": "base.weights / --start", "data": "base.data / --data",
                    "project": "base.checkpoint_dir / --checkpoint-dir", "name": "the stage name",
                    "exist_ok": "nothing (always true)", "resume": "--resume"}
TRAINABLE_MODES = ("all", "stage")  # train.trainable (the first is the default)
FITNESS_MODES = ("default", "map50")  # train.fitness (the first is the default)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


@dataclass
class BaseConfig:
    checkpoint_dir: str = "checkpoints"  # stage outputs go to <checkpoint_dir>/yolo11<size>/<stage name>/
    weights: str = "yolo11${model_size}.pt"  # starting FP checkpoint (Ultralytics downloads it when missing)
    data: str = "coco.yaml"  # Ultralytics data yaml (name or path)


@dataclass
class QuantizationConfig:
    threshold_rule: str = QuantSpec.rule  # mean: Δ = t·mean|w| ; max: Δ = t·max|w| (the paper's rule)
    scale_grad: str = QuantSpec.scale_grad  # paper: summed gradients ; normalized: mean / scale, clipped to ±1
    per_channel: bool = QuantSpec.per_channel  # one Wp/Wn per output channel (beyond the paper)
    act_bits: int = QuantSpec.act_bits  # BitLinear activation bits (C2PSA stages)
    act_per_token: bool = QuantSpec.act_per_token  # BitLinear absmax per token (pixel) instead of per tensor
    restore_token_stats: bool = QuantSpec.restore_token_stats  # BitLinear puts each token's LayerNorm mean/std back
    learn_threshold: bool = QuantSpec.learn_threshold  # t of Δ = t·mean|w| learned per layer (train.threshold_lr)
    threshold_per_channel: bool = QuantSpec.threshold_per_channel  # Δ = t·mean|w| per output channel (TTQ layers)
    bn_reestimate_images: int = 0  # post-training ternarisation: re-estimate BatchNorm statistics on this many
    # training images (val-style letterbox, no labels needed) after ternarising; 0 = keep the FP statistics


@dataclass
class TrainConfig:
    epochs: int = 100
    batch: int = 8
    imgsz: int = 640
    optimizer: str = "Adam"
    lr0: float = 1.0e-4
    lrf: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    warmup_epochs: float = 1.0
    warmup_bias_lr: float = 0.0
    patience: int = 20
    scale_lr: float = 1.0e-4  # learning rate of the Wp/Wn (Ap/An) group
    scale_weight_decay: float = 0.0
    threshold_lr: float = 1.0e-3  # learning rate of learned threshold factors (quantization.learn_threshold)
    latent_lr: Optional[float] = None  # own learning rate for the latent weights of quantized layers (None: lr0)
    latent_weight_decay: Optional[float] = None  # their weight decay when latent_lr is set (None: weight_decay)
    ternary_ramp: str = "none"  # none | magnitude | layer_deep_first | layer_early_first (yolo_tq/train/ramp.py)
    ternary_ramp_epochs: int = 0  # epochs until the stage's new layers are fully ternary (must be < epochs)
    ternary_ramp_start: float = 0.5  # magnitude ramp: share of ternary weights at the first epoch
    ternary_freeze_epochs: int = 0  # last epochs with the new layers' ternary pattern frozen (yolo_tq/train/ramp.py)
    bn_frozen_stats: bool = False  # BatchNorm running statistics stay as loaded (BN in eval mode while training)
    trainable: str = "all"  # all: every network parameter trains ; stage: only this stage's quantized layers (their
    # latent weights, biases and learned scales), all else frozen, as the original code did (docs/original_recipe.md)
    fitness: str = "default"  # default: Ultralytics' fitness ; map50: mAP50 picks best.pt and drives early stopping
    final_imgsz: int = 0  # the stage's last final_epochs epochs train at this size (0: off; train/resolution.py)
    final_epochs: int = 0
    device: Optional[str] = None
    workers: int = 8
    seed: int = 0
    deterministic: bool = True
    amp: bool = True
    val: bool = True
    plots: bool = True
    save_period: int = -1
    ultralytics: Dict[str, Any] = field(default_factory=dict)  # any other Ultralytics train argument, passed through


@dataclass
class DistillConfig:
    enabled: bool = False
    teacher: str = "fp"  # fp: base.weights ; start: the stage's starting checkpoint ; or a checkpoint path
    cls_weight: float = 1.0  # class-score KL (teacher's sigmoid scores)
    box_weight: float = 1.0  # DFL box-distribution KL
    feature_weight: float = 0.0  # MSE at the layers holding ternary convs (0 = off)
    temperature: float = 1.0
    reconstruct_steps: int = 0  # before training: steps fitting the stage's new layers to the teacher's outputs
    # (needs the teacher: skipped when distillation is off)
    reconstruct_lr: float = 1.0e-3  # Adam lr of that feature reconstruction (yolo_tq/train/reconstruct.py)
    reconstruct_imgsz: Optional[int] = None  # its image size (None: train.imgsz)


@dataclass
class StageConfig:
    name: str = "stage"
    layers: List[int] = field(default_factory=list)  # layer indices of the model yaml to ternarise
    include_1x1: bool = False
    threshold: float = QuantSpec.threshold
    detect_head: bool = False  # also the Detect head's inner convs (its output convs and DFL stay FP)
    c2psa: Optional[str] = None  # bitlinear_ttq | bitlinear_standard: replace the convs inside C2PSA
    train: Dict[str, Any] = field(default_factory=dict)  # overrides of the top-level `train` for this stage


@dataclass
class ProjectConfig:
    model_size: str = "n"
    base: BaseConfig = field(default_factory=BaseConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stages: List[StageConfig] = field(default_factory=list)


_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _check_keys(node: Any, schema: type, where: str, source: str) -> None:
    """Raise ConfigError for any key not in the dataclass schema, naming the key and the valid ones."""
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(node).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown config key '{full}'; valid keys here: {', '.join(fields)}")
        sub = {"base": BaseConfig, "quantization": QuantizationConfig, "train": TrainConfig,
               "distill": DistillConfig}.get(key)
        if schema is ProjectConfig and sub is not None and value is not None:
            _check_keys(value, sub, full, source)
        elif schema is ProjectConfig and key == "stages":
            if not isinstance(value, list):
                raise ConfigError(f"{source}: 'stages' must be a list of stage mappings")
            for i, stage in enumerate(value):
                _check_keys(stage, StageConfig, f"stages[{i}]", source)
        elif schema is StageConfig and key == "train" and value is not None:
            for k in value:
                if k not in _TRAIN_KEYS:
                    raise ConfigError(
                        f"{source}: unknown config key '{full}.{k}'; valid keys here: {', '.join(sorted(_TRAIN_KEYS))}"
                    )


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (YAML errors: the problem and where it is)."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.MarkedYAMLError) and mark is not None:
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = message_lines(e)
    return lines[0] if lines else type(e).__name__


def message_lines(e: BaseException) -> list[str]:
    """The non-empty lines of an exception's message, without terminal colour codes and help links."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    return [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("http")]


def imgsz_problem(imgsz: Any) -> str | None:
    """Why an image size is refused, or None. Ultralytics rounds 0 or 31 up to 32 (500 to 512) with only a warning
    in its log, and trains or validates at a size other than the one recorded: only positive multiples of 32 pass."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % MAX_STRIDE:
        return f"imgsz must be a positive multiple of {MAX_STRIDE} (YOLO11's largest stride), got {imgsz!r}"
    return None


def _ultralytics_args_problem(extra: dict) -> str | None:
    """Why a train.ultralytics mapping is refused: a key Ultralytics does not know (it would raise SyntaxError at the
    trainer), one this project sets itself, or one with its own key under `train` (which it would silently replace)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    for key in extra:
        if key in PROJECT_SET_ARGS:
            return f"train.ultralytics.{key} is set by this project (use {PROJECT_SET_ARGS[key]})"
        if key in _TRAIN_KEYS:
            return f"train.ultralytics.{key} has its own key: use train.{key} (or --{key.replace('_', '-')})"
        if key not in DEFAULT_CFG_DICT:
            close = difflib.get_close_matches(str(key), list(DEFAULT_CFG_DICT), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return f"train.ultralytics.{key} is not an Ultralytics train argument{hint}"
    return None


def train_args_problem(t: dict) -> str | None:
    """Why a stage's effective train arguments (stage_train_args) are refused, or None: Ultralytics' own type and range
    checks (check_cfg: epochs >= 1, lr0 in [0, 1], ...) run now instead of at the trainer, plus what they let through
    (imgsz, batch, workers, this project's learning rates)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    extra = t.get("ultralytics") or {}
    problem = _ultralytics_args_problem(extra)
    if problem:
        return problem
    try:
        check_cfg({**{k: v for k, v in t.items() if k in DEFAULT_CFG_DICT}, **extra}, hard=True)
    except (TypeError, ValueError) as e:
        return first_line(e)
    if imgsz_problem(t["imgsz"]):
        return imgsz_problem(t["imgsz"])
    if t.get("final_imgsz") and imgsz_problem(t["final_imgsz"]):
        return "final_" + imgsz_problem(t["final_imgsz"])
    if not (isinstance(t.get("final_epochs", 0), int) and t.get("final_epochs", 0) >= 0):
        return f"final_epochs must be an integer >= 0, got {t['final_epochs']!r}"
    if not (t["batch"] == -1 or t["batch"] > 0):
        return f"batch must be > 0 (or -1 for Ultralytics' AutoBatch), got {t['batch']}"
    if t["workers"] < 0:
        return f"workers must be >= 0, got {t['workers']}"
    for key, valid in (("trainable", TRAINABLE_MODES), ("fitness", FITNESS_MODES)):
        if t.get(key, valid[0]) not in valid:
            return f"{key} must be one of {', '.join(valid)}, got {t[key]!r}"
    for key in ("scale_lr", "scale_weight_decay", "latent_lr", "latent_weight_decay"):
        v = t.get(key)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            return f"{key} must be a finite number >= 0, got {v!r}"
    return None


def _validate_values(cfg: ProjectConfig, source: str) -> None:
    if cfg.model_size not in MODEL_SIZES:
        raise ConfigError(f"{source}: model_size must be one of {', '.join(MODEL_SIZES)}, got {cfg.model_size!r}")
    if cfg.quantization.bn_reestimate_images < 0:
        raise ConfigError(f"{source}: quantization.bn_reestimate_images must be >= 0")
    if cfg.distill.reconstruct_steps < 0 or cfg.distill.reconstruct_lr <= 0:
        raise ConfigError(f"{source}: distill.reconstruct_steps must be >= 0 and distill.reconstruct_lr > 0")
    if cfg.distill.reconstruct_imgsz is not None and imgsz_problem(cfg.distill.reconstruct_imgsz):
        raise ConfigError(f"{source}: distill.reconstruct_" + imgsz_problem(cfg.distill.reconstruct_imgsz))
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: stage names must be unique, got {names}")
    for s in cfg.stages:
        if s.c2psa is not None and s.c2psa not in C2PSA_MODES:
            raise ConfigError(f"{source}: stage '{s.name}' c2psa must be one of {C2PSA_MODES} or null")
        try:
            stage_plan(cfg, s)
        except SpecError as e:
            raise ConfigError(f"{source}: stage '{s.name}': {e}") from e
        problem = train_args_problem(stage_train_args(cfg, s))
        if problem:
            raise ConfigError(f"{source}: stage '{s.name}': {problem}")


def _read_yaml(p: Path, source: str) -> Any:
    """The file's top-level YAML value ({} when empty); a mapping through OmegaConf (its loader and interpolation)."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        top = yaml.safe_load(p.read_text(encoding="utf-8"))  # only to see what it is: a text file is a str
        if isinstance(top, dict):
            top = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException, ValueError, OSError) as e:
        raise ConfigError(f"{source}: cannot parse YAML: {first_line(e)}") from e
    return {} if top is None else top


# ---------------------------------------------------------------------- the original code's configuration layout
ORIGINAL_RECIPE = REPO_ROOT / "configs" / "original" / "stage1_progressive.yaml"
_ORIGINAL_STAGE_KEYS = {"target_layers": "layers", "quantize_1x1_conv": "include_1x1", "threshold": "threshold"}
_ORIGINAL_IGNORED = {  # why a key of the original layout is not read
    "name": "a stage is named by its key, which also names its output folder",
    "description": "a comment",
    "val": "validation during training uses Ultralytics' val batch (twice the train batch) at train.imgsz",
    "logging": "outputs go to <checkpoint_dir>/yolo11<size>/<stage>/; W&B and the other loggers are Ultralytics' "
               "(e.g. `yolo settings wandb=True`)",
    "quantize_first_layer": "the network's first conv is never ternarised",
    "weights": "a stage after the first starts from the previous stage's best.pt (train.py --start CKPT overrides)",
    "wandb_project": "W&B is enabled through Ultralytics (`yolo settings wandb=True`), which names its runs",
}
_ORIGINAL_IGNORED["wandb_entity"] = _ORIGINAL_IGNORED["wandb_project"]


def _original_train_args(train: dict, where: str, notes: list) -> dict:
    """A stage's train mapping of the original layout: this project's train keys, other Ultralytics arguments under
    `ultralytics`; anything else is noted as ignored."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    args: dict = {}
    for key, value in train.items():
        if key in _TRAIN_KEYS and key != "ultralytics":
            args[key] = value
        elif key in DEFAULT_CFG_DICT and key not in PROJECT_SET_ARGS:
            args.setdefault("ultralytics", {})[key] = value
        else:
            notes.append((f"{where}.{key}", "not an Ultralytics train argument, or one this project sets itself"))
    return args


def _original_stage(name: str, body: Any, first: bool, out: dict, notes: list, source: str) -> dict:
    """One `stages.<name>` mapping of the original layout as a stage of this project's `stages` list (the first
    stage's model.weights becomes base.weights)."""
    where = f"stages.{name}"
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(body).__name__}")
    stage: dict = {"name": str(name), "layers": []}
    for key, value in body.items():
        if key in ("model", "quantization") and isinstance(value, dict):
            for k, v in value.items():
                if key == "model" and k == "weights" and first:
                    out["base"]["weights"] = v
                elif key == "quantization" and k in _ORIGINAL_STAGE_KEYS:
                    stage[_ORIGINAL_STAGE_KEYS[k]] = v
                else:
                    notes.append((f"{where}.{key}.{k}", _ORIGINAL_IGNORED.get(k, "not a key of this project")))
        elif key == "train" and isinstance(value, dict):
            stage["train"] = _original_train_args(value, f"{where}.train", notes)
        else:
            notes.append((f"{where}.{key}", _ORIGINAL_IGNORED.get(key, "not a key of this project")))
    return stage


def from_original_layout(raw: dict, source: str) -> dict:
    """A config in the original code's layout (`stages: {stage1: {model, quantization, train, val, logging}, ...}`)
    as this project's, on top of the original recipe (ORIGINAL_RECIPE: the settings its code hard-wired). Read:
    model_size, base.checkpoint_dir, data.train, the first stage's model.weights, and per stage its key (the stage
    name), quantization.target_layers / quantize_1x1_conv / threshold and its train arguments. One note line on
    stderr per key it ignores."""
    out, notes = _read_yaml(ORIGINAL_RECIPE, str(ORIGINAL_RECIPE)), []
    for key, value in raw.items():
        sub = value if isinstance(value, dict) else {}
        if key == "model_size":
            out["model_size"] = value
        elif key in ("base", "data") and sub:
            for k, v in sub.items():
                if (key, k) == ("base", "checkpoint_dir"):
                    out["base"]["checkpoint_dir"] = v
                elif (key, k) == ("data", "train"):
                    out["base"]["data"] = v
                elif (key, k) != ("data", "val") or v != sub.get("train"):  # data.val = data.train loses nothing
                    notes.append((f"{key}.{k}", "Ultralytics reads both splits from the one data yaml (data.train)"
                                  if key == "data" else _ORIGINAL_IGNORED.get(k, "not a key of this project")))
        elif key != "stages":
            notes.append((key, "not a key of the original layout that this project reads"))
    items = list(raw["stages"].items())
    out["stages"] = [_original_stage(n, b, i == 0, out, notes, source) for i, (n, b) in enumerate(items)]
    print(f"note: {source}: the original code's layout (`stages` as a mapping), read onto the original recipe "
          f"{ORIGINAL_RECIPE.relative_to(REPO_ROOT)}", file=sys.stderr)
    for key, why in notes:
        print(f"note: {source}: '{key}' ignored: {why}", file=sys.stderr)
    return out


def original_layout(raw: Any, source: str) -> Any:
    """`raw` itself, or converted when it is in the original code's progressive layout (from_original_layout). The
    original's flat C2PSA layout (top-level `stage`, `quantization.technique`) is refused with how to convert it."""
    if isinstance(raw, dict) and isinstance(raw.get("stages"), dict):
        return from_original_layout(raw, source)
    if isinstance(raw, dict) and isinstance(raw.get("quantization"), dict) and "technique" in raw["quantization"]:
        raise ConfigError(f"{source} is in the original code's C2PSA layout (quantization.technique); start from "
                          f"configs/original/stage2_c2psa.yaml (BitLinear_TTQ) or "
                          f"configs/original/stage2_c2psa_standard.yaml (standard BitLinear) and give the values "
                          f"you changed as flags (--epochs, --batch, --imgsz, --lr0, --patience, --data) or "
                          f"--set KEY=VALUE")
    return raw


def _apply_dotlist(cfg, dotlist: list[str], source: str) -> None:
    """--set KEY=VALUE items, each naming a key the config has (a new key only under train.ultralytics, checked later
    against Ultralytics' arguments, or inside an existing stage)."""
    for item in dotlist:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE, got '{item}'")
        stage = re.match(r"stages\[(-?\d+)\]", key)
        if stage and not 0 <= int(stage.group(1)) < len(cfg.stages):
            raise ConfigError(f"{source}: '{key}' in override '{item}' names no stage; this config has "
                              f"stages[0] to stages[{len(cfg.stages) - 1}]")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not (
                key.startswith("train.ultralytics.") or stage):
            raise ConfigError(f"{source}: unknown config key '{key}' in override '{item}'")
        cfg.merge_with_dotlist([item])


def load_config(path: str | Path | None, overrides: dict | None = None,
                dotlist: list[str] | None = None) -> ProjectConfig:
    """Load a YAML config, apply overrides, resolve interpolation and validate.

    `overrides` maps flat names to values: model_size, weights, data, checkpoint_dir and any `train` key (epochs,
    imgsz, batch, device, ...). A train override applies to every stage (it replaces per-stage values too).
    `dotlist` takes OmegaConf 'a.b=value' strings for anything else.
    """
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
            p = REPO_ROOT / p  # default configs resolve from any working directory
        raw = original_layout(_read_yaml(p, source), source)
    _check_keys(raw, ProjectConfig, "", source)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ProjectConfig), raw)
        _apply_dotlist(cfg, dotlist or [], source)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key == "model_size":
                cfg.model_size = value
            elif key in ("weights", "data", "checkpoint_dir"):
                cfg.base[key] = str(value)
            elif key in _TRAIN_KEYS:
                cfg.train[key] = value
                for stage in cfg.stages:
                    stage.train.pop(key, None)
            else:
                raise ConfigError(f"unknown override '{key}'")
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    _validate_values(obj, source)
    return obj


def stage_train_args(cfg: ProjectConfig, stage: StageConfig) -> dict:
    """Effective training hyper-parameters of a stage: top-level `train` merged with the stage's own overrides."""
    merged = dataclasses.asdict(cfg.train)
    merged.update(stage.train or {})
    extra = dict(cfg.train.ultralytics)
    extra.update((stage.train or {}).get("ultralytics", {}) or {})
    merged["ultralytics"] = extra
    return merged


def stage_plan(cfg: ProjectConfig, stage: StageConfig) -> StagePlan:
    """The typed plan of one stage: its layers and the QuantSpecs of what they become."""
    q = cfg.quantization
    spec = QuantSpec("ttq", float(stage.threshold), q.threshold_rule, q.scale_grad, bool(q.per_channel),
                     int(q.act_bits), bool(q.act_per_token), bool(q.restore_token_stats),
                     learn_threshold=bool(q.learn_threshold), threshold_per_channel=bool(q.threshold_per_channel))
    c2psa = None if stage.c2psa is None else spec.replace(kind=stage.c2psa, per_channel=False,
                                                          threshold_per_channel=False)
    return StagePlan(stage.name, tuple(stage.layers), bool(stage.include_1x1), bool(stage.detect_head), spec, c2psa)


def find_stage(cfg: ProjectConfig, key: int | str) -> tuple[int, StageConfig]:
    """A stage by 1-based number or by name."""
    if isinstance(key, str) and not key.isdigit():
        for i, s in enumerate(cfg.stages):
            if s.name == key:
                return i, s
        raise ConfigError(f"no stage named {key!r}; stages: {', '.join(s.name for s in cfg.stages)}")
    n = int(key)
    if not 1 <= n <= len(cfg.stages):
        raise ConfigError(f"stage {n} does not exist; this config has stages 1..{len(cfg.stages)}")
    return n - 1, cfg.stages[n - 1]


def stage_dir(cfg: ProjectConfig, stage: StageConfig) -> Path:
    """<checkpoint_dir>/yolo11<size>/<stage name>"""
    return Path(cfg.base.checkpoint_dir) / f"yolo11{cfg.model_size}" / stage.name


def check_device(device: Any) -> None:
    """Refuse a device this machine lacks (Ultralytics' select_device, asked before any work instead of at the
    trainer or validator, which would raise it as a traceback)."""
    if device is None or str(device).strip() == "":
        return
    from ultralytics.utils.torch_utils import select_device

    try:
        select_device(str(device), verbose=False)
    except ValueError as e:
        import torch

        raise ConfigError(f"device {device!r} is not available: {first_line(e).split('. ')[0]} (this machine has "
                          f"{torch.cuda.device_count()} CUDA devices; --device cpu runs on the CPU)") from e


def check_dataset(data: str, splits: tuple[str, ...] = ("val",)) -> dict:
    """The data yaml parsed and checked by Ultralytics (check_det_dataset, which downloads a known dataset that is
    missing, as the trainer would), with every split in `splits` present; any problem is one ConfigError."""
    from ultralytics.data.utils import check_det_dataset

    data = str(data)
    local = Path(data).is_file()
    if data.endswith((".yaml", ".yml")) and (os.sep in data or data.startswith(".")) and not local:
        raise ConfigError(f"data yaml not found: {data}")
    info: dict = {}
    try:
        if local:  # Ultralytics reports a syntax error on several lines: this names the problem and where
            yaml.safe_load(Path(data).read_text(encoding="utf-8"))
        for split in splits:
            info = check_det_dataset(data, split=split)
    except Exception as e:  # noqa: BLE001 - anything wrong with the data yaml or its folders means the same to the user
        hint = "" if local or "download" not in str(e).lower() else (
            " Offline, pass a local data yaml: --data /path/data.yaml (run.sh: DATA=/path/data.yaml).")
        raise ConfigError(f"data {data}: {first_line(e)}{hint}") from e
    return info


DATASET_ERRORS = ("No valid images found", "No labels found", "Dataset '")


@contextmanager
def dataset_errors(data: str):
    """Ultralytics' errors about the images and labels of a split (all labels invalid, no labels), raised when the
    trainer or validator builds its dataset, as one ConfigError naming the data yaml and the first problem."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        if isinstance(e, ConfigError) or not any(m in str(e) for m in DATASET_ERRORS):
            raise
        raise ConfigError(f"data {data}: {' '.join(message_lines(e)[:2])}") from e
