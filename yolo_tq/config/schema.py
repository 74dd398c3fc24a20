"""The config schema: the dataclasses every config file is checked against, their defaults (taken from the plan
classes, yolo_tq/plan.py, and from QuantSpec), the constants they use, and the error type.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..plan import DistillPlan, FinalPassPlan, OptimPlan, RampPlan, StagePlan, TrainPlan
from ..quant.spec import BITLINEAR_KINDS, QuantSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
C2PSA_MODES = BITLINEAR_KINDS
WEIGHT_KINDS = ("ttq", "int")  # stages[i].weights.kind
MAX_STRIDE = 32  # YOLO11's largest stride: Ultralytics rounds any other image size up to a multiple of it
# Ultralytics arguments this project sets itself for every stage: train.ultralytics must not carry them
PROJECT_SET_ARGS = {"model": "base.weights / --start", "data": "base.data / --data",
                    "project": "base.checkpoint_dir / --checkpoint-dir", "name": "the stage name",
                    "exist_ok": "nothing (always true)", "resume": "--resume"}


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
    # the TTQ keys below take their defaults from the plan (yolo_tq/plan.py), which documents them
    scale_lr: float = OptimPlan.scale_lr  # learning rate of the Wp/Wn (Ap/An) group
    scale_weight_decay: float = OptimPlan.scale_weight_decay
    threshold_lr: float = OptimPlan.threshold_lr  # learned threshold factors (quantization.learn_threshold)
    latent_lr: Optional[float] = OptimPlan.latent_lr  # latent weights of quantized layers (None: lr0)
    latent_weight_decay: Optional[float] = OptimPlan.latent_weight_decay  # with latent_lr (None: weight_decay)
    ternary_ramp: str = RampPlan.mode  # none | magnitude | layer_deep_first | layer_early_first (train/ramp.py)
    ternary_ramp_epochs: int = RampPlan.epochs  # epochs until the new layers are fully ternary (< epochs)
    ternary_ramp_start: float = RampPlan.start  # magnitude ramp: share of ternary weights at the first epoch
    ternary_freeze_epochs: int = RampPlan.freeze_epochs  # last epochs with the new layers' ternary pattern frozen
    bn_frozen_stats: bool = TrainPlan.bn_frozen  # BatchNorm running statistics stay as loaded (BN in eval mode)
    trainable: str = TrainPlan.trainable  # all: every network parameter trains ; stage: only this stage's quantized
    # layers (their latent weights, biases and learned scales), all else frozen, as the original code did
    # (docs/original_recipe.md)
    fitness: str = TrainPlan.fitness  # default: Ultralytics' fitness ; map50: mAP50 picks best.pt and early stopping
    final_imgsz: int = FinalPassPlan.imgsz  # the last final_epochs epochs train at this size (0: off; resolution.py)
    final_epochs: int = FinalPassPlan.epochs
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
    teacher: str = DistillPlan.teacher  # fp: base.weights ; start: the stage's start checkpoint ; or a checkpoint
    cls_weight: float = DistillPlan.cls_weight  # class-score KL (teacher's sigmoid scores)
    box_weight: float = DistillPlan.box_weight  # DFL box-distribution KL
    feature_weight: float = DistillPlan.feature_weight  # MSE at the layers holding ternary convs (0 = off)
    temperature: float = DistillPlan.temperature
    reconstruct_steps: int = DistillPlan.reconstruct_steps  # before training: steps fitting the stage's new layers to
    # the teacher's outputs (needs the teacher: skipped when distillation is off)
    reconstruct_lr: float = DistillPlan.reconstruct_lr  # Adam lr of that feature reconstruction (train/reconstruct.py)
    reconstruct_imgsz: Optional[int] = DistillPlan.reconstruct_imgsz  # its image size (None: train.imgsz)


@dataclass
class StageConfig:
    name: str = "stage"
    layers: List[int] = field(default_factory=list)  # layer indices of the model yaml to ternarise
    include_1x1: bool = StagePlan.include_1x1
    threshold: float = QuantSpec.threshold
    detect_head: bool = StagePlan.detect_head  # also the Detect head's inner convs (its output convs and DFL stay FP)
    c2psa: Optional[str] = None  # bitlinear_ttq | bitlinear_standard: replace the convs inside C2PSA
    c2psa_blocks: str = StagePlan.c2psa_blocks  # all: in every PSABlock ; first: only the first (the original's)
    weights: Dict[str, Any] = field(default_factory=dict)  # what the stage's convs become: {kind: ttq} (the default)
    # or {kind: int, bits: 2..8} (LSQ integer weights, a learned step per output channel)
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


MAX_IMGSZ = 4096


def imgsz_problem(imgsz: Any) -> str | None:
    """Why an image size is refused, or None. Ultralytics rounds 0 or 31 up to 32 (500 to 512) with only a warning
    in its log, and trains or validates at a size other than the one recorded: only positive multiples of 32 pass,
    up to MAX_IMGSZ (above it one letterboxed batch alone needs gigabytes)."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % MAX_STRIDE:
        return f"imgsz must be a positive multiple of {MAX_STRIDE} (YOLO11's largest stride), got {imgsz!r}"
    if imgsz > MAX_IMGSZ:
        return f"imgsz must be at most {MAX_IMGSZ}, got {imgsz}"
    return None


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
