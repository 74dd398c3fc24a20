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
    """The data yaml parsed and checked by Ultralytics (check_det_dataset, which downloads a dataset that is missing
    from its archive URL, as the trainer would), with every split in `splits` present; any problem is one
    ConfigError. A `download:` script in a local yaml is never run unless allowed (--allow-download-script); every
    command checks its data here before Ultralytics sees it, so Ultralytics never finds it missing."""
    from ultralytics.data.utils import check_det_dataset

    data = str(data)
    local = Path(data).is_file()
    if data.endswith((".yaml", ".yml")) and (os.sep in data or data.startswith(".")) and not local:
        raise ConfigError(f"data yaml not found: {data}")
    info: dict = {}
    script = False
    try:
        if local:  # Ultralytics reports a syntax error on several lines: this names the problem and where
            script = download_script(yaml.safe_load(Path(data).read_text(encoding="utf-8")))
        fetch = not script or download_scripts_allowed()  # a script in a file is code: never run unless asked
        for split in splits:
            info = check_det_dataset(data, autodownload=fetch, split=split)
    except Exception as e:  # noqa: BLE001 - anything wrong with the data yaml or its folders means the same to the user
        if script and not download_scripts_allowed() and isinstance(e, FileNotFoundError):
            raise ConfigError(f"data {data}: the dataset is missing and the yaml's `download:` entry is a script, "
                              f"which is never run unless you ask: pass --allow-download-script (run.sh: "
                              f"ALLOW_DOWNLOAD_SCRIPT=1), or put the dataset in place yourself") from e
        hint = "" if local or "download" not in str(e).lower() else (
            " Offline, pass a local data yaml: --data /path/data.yaml (run.sh: DATA=/path/data.yaml).")
        raise ConfigError(f"data {data}: {first_line(e)}{hint}") from e
    return info


ALLOW_SCRIPT_ENV = "YOLO_TQ_ALLOW_DOWNLOAD_SCRIPT"  # set by --allow-download-script
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".xz", ".bz2", ".txz", ".tbz2")  # what Ultralytics fetches as a URL


def download_script(parsed: Any) -> bool:
    """True when a data yaml's `download:` entry is code (a Python or bash script Ultralytics would run when the
    dataset is missing), as opposed to an archive URL or nothing."""
    s = parsed.get("download") if isinstance(parsed, dict) else None
    if not s:
        return False
    s = str(s).strip()
    return not (s.lower().startswith(("http://", "https://")) and s.split("?")[0].lower().endswith(ARCHIVE_SUFFIXES))


def download_scripts_allowed() -> bool:
    return os.environ.get(ALLOW_SCRIPT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
