"""The original code's configuration layout (`stages` as a mapping of stage names), read onto the original recipe."""

from __future__ import annotations

import sys
from typing import Any

from .schema import _TRAIN_KEYS, PROJECT_SET_ARGS, REPO_ROOT, ConfigError, _read_yaml

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
