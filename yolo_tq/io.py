"""Files: the one atomic writer, and checkpoint I/O (one format: Ultralytics' pickled-model dict)."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of the wrong model."""


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(FP32 model in eval mode, checkpoint dict) from any checkpoint this project or Ultralytics writes."""
    from ultralytics.nn.tasks import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        model, ckpt = load_checkpoint(p)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return model, ckpt


def ensure_weights(name: str) -> str:
    """A local path for `name`: the file itself, or, for a bare official name such as 'yolo11n.pt', Ultralytics'
    own download (into the current folder). Offline users pass a local path instead."""
    p = Path(name)
    if p.is_file():
        return str(p)
    if os.sep in name or "/" in name or not name.endswith(".pt"):
        raise CheckpointError(f"weights not found: {name}")
    from ultralytics.utils.downloads import attempt_download_asset

    try:
        got = attempt_download_asset(name)
    except Exception as e:  # noqa: BLE001 - offline, or no such asset
        raise CheckpointError(f"cannot download {name} ({type(e).__name__}); pass a local file with --weights PATH "
                              f"(or WEIGHTS=PATH for run.sh)") from e
    if not Path(got).is_file():
        raise CheckpointError(f"cannot download {name}; pass a local file with --weights PATH (or WEIGHTS=PATH)")
    return str(got)


def model_size_of(model: nn.Module) -> str | None:
    """'n', 's', 'm', 'l' or 'x' for a YOLO11 model (from its yaml's scale or file name), None if unknown."""
    y = getattr(model, "yaml", None) or {}
    if y.get("scale") in ("n", "s", "m", "l", "x"):
        return y["scale"]
    m = re.search(r"yolo\d+([nslmx])", str(y.get("yaml_file", "")))
    return m.group(1) if m else None


def check_model_size(model: nn.Module, expected: str, source: str) -> None:
    size = model_size_of(model)
    if size is not None and size != expected:
        raise CheckpointError(f"{source} is a yolo11{size} checkpoint, but the config asks for yolo11{expected} "
                              f"(pass --model-size {size} or another checkpoint)")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """The one writer of every file the project writes: a temporary file in the same folder, fsync, then rename.
    A crash never leaves a half-written file, and the previous version stays until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text (UTF-8) through atomic_write_bytes."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(obj, path: str | Path) -> str:
    """JSON (indented, non-JSON values as str) through atomic_write_bytes; returns the path."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return str(path)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save through atomic_write_bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_stock_checkpoint(model: nn.Module, path: str | Path, train_args: dict | None = None, extra: dict | None = None) -> Path:
    """Save `model` the way Ultralytics saves final weights (FP16 pickled model under 'model'), so that
    `ultralytics.YOLO(path)` loads it on any machine. `model` must hold only Ultralytics / torch classes."""
    from ultralytics import __version__

    import copy

    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    if hasattr(m, "criterion"):
        m.criterion = None
    ckpt = {"model": m, "ema": None, "train_args": dict(train_args or {}), "date": datetime.now().isoformat(),
            "version": __version__, "epoch": -1, "optimizer": None}
    ckpt.update(extra or {})
    return atomic_save(ckpt, path)


if __name__ == "__main__":  # run.sh: `python -m yolo_tq.io NAME` prints a local path (downloading an official name)
    from yolo_tq.cli import run_cli
    from yolo_tq.io import ensure_weights as fetch  # the package's class identities, not __main__'s

    run_cli(lambda: print(fetch(sys.argv[1])))
