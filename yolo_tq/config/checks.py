"""Checks of what a config names outside itself: the device and the dataset (Ultralytics' own checks, asked
before any work instead of at the trainer or validator, where they would raise a traceback)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError, first_line, message_lines

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
