"""The typed training plan: what a stage installs and how it trains, and the one home of its defaults.

Built once per requested stage (train/preflight.plan_stages), checked once (train/preflight.preflight), then passed
along unchanged. It crosses Ultralytics' DDP re-launch and resume as `dataclasses.asdict(plan)` inside the trainer
arguments and comes back as `TrainPlan(**d)`: each plan turns its nested dicts back into plans in __post_init__, and a
key an older checkpoint lacks takes the field's default, written once, here. The config's fields take their defaults
from these classes (config/schema.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .quant.spec import QuantSpec

RAMP_MODES = ("none", "magnitude", "layer_deep_first", "layer_early_first")  # train.ternary_ramp
TRAINABLE_MODES = ("all", "stage")  # train.trainable (the first is the default)
FITNESS_MODES = ("default", "map50")  # train.fitness (the first is the default)
C2PSA_BLOCKS = ("all", "first")  # stages[i].c2psa_blocks: every PSABlock of a C2PSA, or its first (the original's)
TERNARY_EXPORT_NAME = "ternary.pt"  # the stage's stock-loadable ternary export, in its output folder


def _as(cls, value):
    """`value` as a `cls` plan: a dict (from asdict, a checkpoint or the DDP state file) is rebuilt with cls(**d)."""
    return cls(**value) if isinstance(value, dict) else value


def _set(plan, name: str, value) -> None:
    object.__setattr__(plan, name, value)  # frozen dataclasses: only __post_init__ normalises


@dataclass(frozen=True)
class StagePlan:
    """What one stage adds: TTQ on the convs of `layers` (with `spec`), and BitLinear on C2PSA (with `c2psa`)."""

    name: str
    layers: tuple[int, ...] = ()
    include_1x1: bool = False
    detect_head: bool = False  # also the Detect head's inner convs (its output convs and DFL stay FP)
    spec: QuantSpec = field(default_factory=QuantSpec)
    c2psa: QuantSpec | None = None
    c2psa_blocks: str = C2PSA_BLOCKS[0]  # all: every PSABlock of each C2PSA ; first: only its first, m[0]

    def __post_init__(self):
        _set(self, "layers", tuple(self.layers))
        _set(self, "spec", _as(QuantSpec, self.spec))
        _set(self, "c2psa", _as(QuantSpec, self.c2psa))


@dataclass(frozen=True)
class OptimPlan:
    """Optimizer groups beyond Ultralytics': the learned scales, and (with latent_lr) the latent weights."""

    scale_lr: float = 1.0e-4  # the Wp/Wn (Ap/An) group
    scale_weight_decay: float = 0.0
    latent_lr: float | None = None  # own learning rate of the quantized layers' latent weights (None: lr0)
    latent_weight_decay: float | None = None  # their weight decay when latent_lr is set (None: weight_decay)
    threshold_lr: float = 1.0e-3  # learned threshold factors (quantization.learn_threshold), no weight decay


@dataclass(frozen=True)
class DistillPlan:
    """Distillation from a frozen teacher: its checkpoint (a path, fixed when the plan is built) and the loss
    weights."""

    teacher: str = "fp"
    cls_weight: float = 1.0  # class-score KL (the teacher's sigmoid scores)
    box_weight: float = 1.0  # DFL box-distribution KL
    feature_weight: float = 0.0  # MSE at the layers holding ternary convs (0 = off)
    temperature: float = 1.0
    reconstruct_steps: int = 0  # before training: steps fitting the stage's new layers to the teacher's outputs
    reconstruct_lr: float = 1.0e-3  # Adam lr of that feature reconstruction (train/reconstruct.py)
    reconstruct_imgsz: int | None = None  # its image size (None: the training size)


@dataclass(frozen=True)
class RampPlan:
    """Gradual ternarisation of a stage's new layers (train/ramp.py) and the frozen ternary pattern at its end."""

    mode: str = "none"
    epochs: int = 0
    start: float = 0.5  # magnitude ramp: share of ternary weights at the first epoch
    freeze_epochs: int = 0  # last epochs in which the new layers' ternary pattern is frozen (only scales, FP train)

    def __post_init__(self):
        if self.mode not in RAMP_MODES:
            raise ValueError(f"unknown ternary_ramp {self.mode!r}; valid: {', '.join(RAMP_MODES)}")
        if self.mode != "none" and self.epochs < 1:
            raise ValueError(f"ternary_ramp '{self.mode}' needs ternary_ramp_epochs >= 1")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"ternary_ramp_start must be in [0, 1], got {self.start}")
        if self.freeze_epochs < 0:
            raise ValueError(f"ternary_freeze_epochs must be >= 0, got {self.freeze_epochs}")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def acts(self) -> bool:
        """Whether the trainer has anything to do per epoch (a ramp or a final freeze)."""
        return self.active or self.freeze_epochs > 0


@dataclass(frozen=True)
class FinalPassPlan:
    """The stage's last `epochs` epochs train at `imgsz` (train/resolution.py); imgsz 0 is off."""

    imgsz: int = 0
    epochs: int = 0

    @property
    def active(self) -> bool:
        return self.imgsz > 0 and self.epochs > 0


@dataclass(frozen=True)
class TrainPlan:
    """Everything the trainer needs beyond Ultralytics' own arguments."""

    stage: StagePlan
    optim: OptimPlan = field(default_factory=OptimPlan)
    distill: DistillPlan | None = None
    ramp: RampPlan = field(default_factory=RampPlan)
    bn_frozen: bool = False  # BatchNorm keeps its running statistics (eval mode) while everything else trains
    trainable: str = TRAINABLE_MODES[0]  # all | stage: only this stage's quantized layers train (train.trainable)
    fitness: str = FITNESS_MODES[0]  # default | map50: mAP50 picks best.pt and drives early stopping (train.fitness)
    final_pass: FinalPassPlan = field(default_factory=FinalPassPlan)  # last epochs at the deployment size

    def __post_init__(self):
        for f in fields(self):
            kind = {"stage": StagePlan, "optim": OptimPlan, "distill": DistillPlan, "ramp": RampPlan,
                    "final_pass": FinalPassPlan}.get(f.name)
            if kind is not None:
                _set(self, f.name, _as(kind, getattr(self, f.name)))


@dataclass(frozen=True)
class StageOutputs:
    """Where a stage writes: <checkpoint_dir>/yolo11<size>/<stage name>/ with weights/{best,last}.pt and the ternary
    export."""

    folder: str

    @property
    def dir(self) -> Path:
        return Path(self.folder)

    @property
    def best(self) -> Path:
        return self.dir / "weights" / "best.pt"

    @property
    def last(self) -> Path:
        return self.dir / "weights" / "last.pt"

    @property
    def ternary(self) -> Path:
        return self.dir / TERNARY_EXPORT_NAME

    def as_dict(self) -> dict[str, str]:
        return {"dir": str(self.dir), "best": str(self.best), "last": str(self.last), "ternary": str(self.ternary)}


@dataclass(frozen=True)
class PlannedStage:
    """One requested stage, resolved: its number, outputs, start checkpoint, the Ultralytics trainer arguments and
    the TrainPlan. `start` may be an earlier stage's best.pt that this run writes first; on resume it is last.pt and
    the plan is the one saved in it."""

    number: int  # 1-based
    outputs: StageOutputs
    start: str
    resumed: tuple[int, int | None] | None  # resume: (epochs done, epochs of the run) of its last.pt; else None
    trainer_args: dict  # Ultralytics' train arguments, without model/resume/the plan
    plan: TrainPlan

    @property
    def name(self) -> str:
        return self.plan.stage.name

    def trainer_overrides(self, plan_key: str) -> dict:
        """The trainer's overrides: its Ultralytics arguments, the start (and resume) checkpoint, the plan as a dict
        under `plan_key`."""
        over = {**self.trainer_args, "model": self.start, plan_key: asdict(self.plan)}
        return over if self.resumed is None else {**over, "resume": self.start}
