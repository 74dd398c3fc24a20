"""The training state reaches Weights & Biases through Ultralytics' own W&B callback: a tiny training with W&B on in
offline mode, whose run file (the `.wandb` transaction log `wandb sync` would upload) holds the epoch's ttq/
scalars, equal to results.csv's."""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import install_stage
from yolo_tq.train.state import GROUPS, PREFIX

from conftest import REPO

STAT_NAMES = ("wp_mean", "wp_min", "wp_max", "wn_mean", "wn_min", "wn_max", "zeros", "flips")
BLOCK = 32768  # the .wandb file is LevelDB's log format: 32 KiB blocks of chunks
FULL, LAST = 1, 4  # chunk types that end a record (FIRST 2 and MIDDLE 3 continue it)

TRAIN = textwrap.dedent("""
    import sys
    from dataclasses import asdict
    from ultralytics.utils import SETTINGS
    from yolo_tq.plan import OptimPlan, StagePlan, TrainPlan
    from yolo_tq.train.trainer import TTQTrainer

    SETTINGS.update({"wandb": True, "tensorboard": False})  # in this run's own YOLO_CONFIG_DIR
    start, data, project = sys.argv[1:]
    plan = TrainPlan(StagePlan("now", (4,)), OptimPlan(scale_lr=0.002, scale_weight_decay=0.0))
    TTQTrainer(overrides=dict(model=start, data=data, project=project, name="run", epochs=1, batch=4, imgsz=64,
                              optimizer="AdamW", lr0=0.01, warmup_epochs=0, workers=0, device="cpu", plots=False,
                              val=False, nbs=4, mosaic=0.0, close_mosaic=0, ttq=asdict(plan))).train()
    """)


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte header (":W&B", magic, version), then chunks of a 7-byte
    header (checksum, uint16 length, type) and data, none crossing a block; a block's last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def history_rows(path: Path) -> list[dict]:
    """The run's history: one dict per committed step, key -> value."""
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def _env(tmp_path: Path) -> dict:
    """A fresh interpreter (Ultralytics' logger callbacks stay off while pytest runs) with its own Ultralytics settings
    and W&B offline, every W&B folder under tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS") and not k.startswith("WANDB_")}
    w = tmp_path / "wandb_home"
    env.update(YOLO_CONFIG_DIR=str(tmp_path / "settings"), YOLO_OFFLINE="1", WANDB_MODE="offline",
               WANDB_SILENT="true", WANDB_DIR=str(w), WANDB_CONFIG_DIR=str(w / "config"),
               WANDB_CACHE_DIR=str(w / "cache"), WANDB_DATA_DIR=str(w / "data"), WANDB_ARTIFACT_DIR=str(w / "art"))
    return env


def _read(path) -> bytes | None:
    return Path(path).read_bytes() if Path(path).is_file() else None


def test_wandb_callback_logs_training_state(tmp_path, tiny_fp_checkpoint, tiny_data):
    """One epoch (validated: the last one is, also with val=False) with W&B on through Ultralytics' settings: the
    epoch's history row holds every ttq/ scalar, finite and equal to its results.csv value."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb, or the dev extra)")
    from ultralytics.utils import SETTINGS

    from yolo_tq.io import load_model, save_stock_checkpoint

    user_settings = _read(SETTINGS.file)

    model, _ = load_model(tiny_fp_checkpoint)
    install_stage(model, StagePlan("earlier", (2,)))
    start = save_stock_checkpoint(model, tmp_path / "start.pt")
    r = subprocess.run([sys.executable, "-c", TRAIN, str(start), str(tiny_data), str(tmp_path / "runs")], cwd=REPO,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    keys = [f"{PREFIX}/{g}/{k}" for g in GROUPS for k in STAT_NAMES]
    rows = [h for h in history_rows(files[0]) if any(k.startswith(f"{PREFIX}/") for k in h)]
    with open(run / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [h.get("epoch") for h in rows] == [1] and len(csv_rows) == 1
    for h, row in zip(rows, csv_rows):
        assert set(keys) <= set(h), sorted(set(keys) - set(h))
        assert all(isinstance(h[k], (int, float)) and math.isfinite(h[k]) for k in keys), {k: h[k] for k in keys}
        for k in keys:
            assert h[k] == pytest.approx(float(row[k]), rel=1e-4, abs=1e-7), (k, h["epoch"])
    assert 0 < rows[0][f"{PREFIX}/current/flips"] < 1  # AdamW at 0.01 moves some latent weights across Δ
    written = list((tmp_path / "settings").rglob("settings.json"))  # this run's settings, not the user's file
    assert len(written) == 1 and json.loads(written[0].read_text())["wandb"] is True
    assert _read(SETTINGS.file) == user_settings
