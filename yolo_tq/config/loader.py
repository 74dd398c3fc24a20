"""The one configuration loader: YAML + OmegaConf interpolation, strict key validation, CLI overrides; and the
helpers that read a loaded config (a stage's train arguments, its StagePlan, its outputs).

Every root script calls `load_config(path, overrides)`; nothing else reads config files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..plan import C2PSA_BLOCKS, FITNESS_MODES, TRAINABLE_MODES, StageOutputs, StagePlan
from ..quant.spec import QuantSpec, SpecError
from .original import original_layout
from ..io import MODEL_SIZES
from .schema import (_TRAIN_KEYS, C2PSA_MODES, PROJECT_SET_ARGS, WEIGHT_KINDS, REPO_ROOT, BaseConfig, ConfigError,
                     DistillConfig, ProjectConfig, QuantizationConfig, StageConfig, TrainConfig, _read_yaml, first_line,
                     imgsz_problem)

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
    if not (math.isfinite(cfg.distill.temperature) and cfg.distill.temperature > 0):
        raise ConfigError(f"{source}: distill.temperature must be a finite number > 0, got {cfg.distill.temperature}")
    if cfg.distill.reconstruct_imgsz is not None and imgsz_problem(cfg.distill.reconstruct_imgsz):
        raise ConfigError(f"{source}: distill.reconstruct_" + imgsz_problem(cfg.distill.reconstruct_imgsz))
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: stage names must be unique, got {names}")
    for s in cfg.stages:
        if not s.layers and s.c2psa is None:
            raise ConfigError(f"{source}: stage '{s.name}' quantizes nothing (layers is empty and c2psa is not set)")
        if s.c2psa is not None and s.c2psa not in C2PSA_MODES:
            raise ConfigError(f"{source}: stage '{s.name}' c2psa must be one of {C2PSA_MODES} or null")
        try:
            stage_plan(cfg, s)
        except SpecError as e:
            raise ConfigError(f"{source}: stage '{s.name}': {e}") from e
        problem = train_args_problem(stage_train_args(cfg, s))
        if problem:
            raise ConfigError(f"{source}: stage '{s.name}': {problem}")


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


def _read_extended(p: Path, source: str, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; with `extends: PATH` (relative to the file), the named config's mapping with this
    file's keys merged over it (mappings merge, lists such as `stages` are replaced)."""
    raw = original_layout(_read_yaml(p, source), source)
    parent = raw.pop("extends", None) if isinstance(raw, dict) else None
    if parent is None:
        return raw
    base = (p.parent / str(parent)).resolve()
    if base in seen or base == p.resolve():
        raise ConfigError(f"{source}: 'extends: {parent}' makes a loop ({' -> '.join(map(str, seen + (base,)))})")
    if not base.is_file():
        raise ConfigError(f"{source}: 'extends: {parent}' names no file ({base})")
    under = _read_extended(base, str(base), seen + (p.resolve(),))
    _check_keys(under, ProjectConfig, "", str(base))
    _check_keys(raw, ProjectConfig, "", source)
    return OmegaConf.to_container(OmegaConf.merge(under, raw))


def load_config(path: str | Path | None, overrides: dict | None = None,
                dotlist: list[str] | None = None) -> ProjectConfig:
    """Load a YAML config, apply overrides, resolve interpolation and validate.

    `overrides` maps flat names to values: model_size, weights, data, checkpoint_dir and any `train` key (epochs,
    imgsz, batch, device, ...). A train override applies to every stage (it replaces per-stage values too).
    `dotlist` takes OmegaConf 'a.b=value' strings for anything else. A file may start from another with
    `extends: PATH` (the plans under configs/plans/ do).
    """
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
            p = REPO_ROOT / p  # default configs resolve from any working directory
        raw = _read_extended(p, source)
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
    """The typed plan of one stage: its layers and the QuantSpecs of what they become (TTQ, or with
    `weights: {kind: int, bits: N}` LSQ integer weights; the C2PSA step's BitLinear layers take the TTQ settings)."""
    q = cfg.quantization
    ttq = QuantSpec("ttq", float(stage.threshold), q.threshold_rule, q.scale_grad, bool(q.per_channel),
                    int(q.act_bits), bool(q.act_per_token), bool(q.restore_token_stats),
                    learn_threshold=bool(q.learn_threshold), threshold_per_channel=bool(q.threshold_per_channel))
    weights = dict(stage.weights or {})
    unknown = sorted(set(weights) - {"kind", "bits"})
    if unknown or weights.get("kind", "ttq") not in WEIGHT_KINDS:
        raise SpecError(f"weights takes {{kind: {' | '.join(WEIGHT_KINDS)}, bits: N}} (bits with kind int), got "
                        f"{weights}")
    if "bits" in weights and weights.get("kind") != "int":
        raise SpecError("weights.bits is for kind int")
    spec = ttq if weights.get("kind", "ttq") == "ttq" else QuantSpec("int", bits=weights.get("bits", QuantSpec.bits))
    c2psa = None if stage.c2psa is None else ttq.replace(kind=stage.c2psa, per_channel=False,
                                                         threshold_per_channel=False)
    if stage.c2psa_blocks not in C2PSA_BLOCKS:
        raise SpecError(f"c2psa_blocks must be one of {', '.join(C2PSA_BLOCKS)}, got {stage.c2psa_blocks!r}")
    return StagePlan(stage.name, tuple(stage.layers), bool(stage.include_1x1), bool(stage.detect_head), spec, c2psa,
                     str(stage.c2psa_blocks))


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


def stage_outputs(cfg: ProjectConfig, stage: StageConfig) -> StageOutputs:
    """<checkpoint_dir>/yolo11<size>/<stage name> and the files a stage writes there."""
    return StageOutputs(str(Path(cfg.base.checkpoint_dir) / f"yolo11{cfg.model_size}" / stage.name))
