"""Training state in the loggers (train.state): hand-worked statistics, the layer grouping, the results.csv column
order, and a tiny training run whose results.csv and TensorBoard event file hold the scalars."""

import csv
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import c2psa_convs, install_stage, quantized_modules, select_convs, stage_paths
from yolo_tq.quant.layers import BitLinear_Standard, TTQConv2d
from yolo_tq.quant.spec import QuantSpec
from yolo_tq.train.state import (TrainingState, find_state_layers, flip_share, ternary_codes, value_summary,
                                 with_training_state, zero_share)

from conftest import REPO, build_model

STAT_NAMES = ("wp_mean", "wp_min", "wp_max", "wn_mean", "wn_min", "wn_max", "zeros", "flips")


def conv_with(weight, kind="ttq", per_channel=False) -> nn.Module:
    """A quantized 1x1 conv holding `weight` (out x in), threshold factor 0.7 of mean|w|."""
    w = torch.tensor(weight, dtype=torch.float32)
    conv = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.view(*w.shape, 1, 1))
    spec = QuantSpec(kind=kind, threshold=0.7, per_channel=per_channel)
    return (TTQConv2d if kind == "ttq" else BitLinear_Standard)(conv, spec)


def test_zero_and_flip_shares_by_hand():
    a = [torch.tensor([[1, 0, -1], [0, 0, 1]], dtype=torch.int8), torch.tensor([0, 1], dtype=torch.int8)]
    assert zero_share(a) == 4 / 8
    b = [torch.tensor([[1, 1, -1], [0, -1, 1]], dtype=torch.int8), torch.tensor([0, 0], dtype=torch.int8)]
    assert flip_share(a, b) == 3 / 8  # 0→1, 0→−1 in the first tensor, 1→0 in the second
    assert flip_share(a, a) == 0.0
    with pytest.raises(ValueError):
        flip_share(a, a[:1])


def test_value_summary_counts_every_channel():
    # a per-layer scale (0.5) and a per-channel one (1, 2, 3): mean (0.5 + 1 + 2 + 3) / 4
    assert value_summary([torch.tensor(0.5), torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)]) == (1.625, 0.5, 3.0)


def test_ternary_codes_by_hand():
    # mean|w| = (2 + 2 + 0.8 + 0.4) / 4 = 1.3: TTQ Δ = 0.91 → 0.8 is zero; BitNet round(0.8 / 1.3) = 1
    w = [[2.0, -2.0, 0.8, -0.4]]
    assert ternary_codes(conv_with(w)).flatten().tolist() == [1, -1, 0, 0]
    assert ternary_codes(conv_with(w, "bitlinear_standard")).flatten().tolist() == [1, -1, 1, 0]
    assert ternary_codes(conv_with(w)).dtype == torch.int8


def test_epoch_stats_by_hand():
    a = conv_with([[2.0, -2.0, 0.8, -0.4]])  # codes 1 -1 0 0
    b = conv_with([[1.0, -1.0], [3.0, 0.1]], per_channel=True)  # mean|w| 1.275, Δ 0.8925: codes 1 -1 / 1 0
    std = conv_with([[2.0, -2.0, 0.8, -0.4]], "bitlinear_standard")  # codes 1 -1 1 0
    with torch.no_grad():
        a.quantizer.wp.fill_(0.5), a.quantizer.wn.fill_(4.0)
        b.quantizer.wp.copy_(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)), b.quantizer.wn.fill_(2.0)
    state = TrainingState({"current": [a, b], "earlier": [std]})
    first = state.epoch_stats()
    assert set(first) == {f"ttq/current/{k}" for k in STAT_NAMES} | {"ttq/earlier/zeros", "ttq/earlier/flips"}
    assert (first["ttq/current/wp_mean"], first["ttq/current/wp_min"], first["ttq/current/wp_max"]) == (1.5, 0.5, 3.0)
    assert (first["ttq/current/wn_mean"], first["ttq/current/wn_min"], first["ttq/current/wn_max"]) == (
        pytest.approx(8 / 3), 2.0, 4.0)
    assert first["ttq/current/zeros"] == 3 / 8 and first["ttq/earlier/zeros"] == 1 / 4
    assert first["ttq/current/flips"] == 0.0 and first["ttq/earlier/flips"] == 0.0  # nothing trained yet
    with torch.no_grad():
        a.latent_weight[0, 2] = 1.6  # mean|w| 1.5, Δ 1.05: 0.8 → 1.6 crosses it (one flip of 8)
        std.latent_weight[0, 3] = 0.4  # −0.4 → 0.4: round(0.4 / 1.3) is still 0 (no flip)
    second = state.epoch_stats()
    assert second["ttq/current/flips"] == 1 / 8 and second["ttq/current/zeros"] == 2 / 8
    assert second["ttq/earlier/flips"] == 0.0
    assert state.epoch_stats()["ttq/current/flips"] == 0.0  # compared with the previous epoch, not the first


def test_results_row_keeps_state_last_and_fills_trainer_metrics():
    a = conv_with([[2.0, -2.0, 0.8, -0.4]])
    # a val=False epoch: trainer.metrics still holds the previous epoch's state, in the middle of the row
    trainer = SimpleNamespace(training_state=TrainingState({"current": [a]}),
                              metrics={"metrics/mAP50(B)": 0.0, "ttq/current/zeros": -1.0, "val/box_loss": 0.0})
    row = {"train/box_loss": 1.0, **trainer.metrics, "lr/pg0": 0.01}
    out = with_training_state(trainer, row)
    keys = list(out)
    assert keys[:4] == ["train/box_loss", "metrics/mAP50(B)", "val/box_loss", "lr/pg0"]
    assert keys[4:] == [f"ttq/current/{k}" for k in STAT_NAMES]
    assert out["ttq/current/zeros"] == 0.5 and trainer.metrics["ttq/current/zeros"] == 0.5
    assert with_training_state(SimpleNamespace(metrics={}), row) is row  # a trainer without layers found: unchanged


def test_find_state_layers_groups_by_stage():
    torch.manual_seed(0)
    model = build_model(nc=2)
    install_stage(model, StagePlan("earlier", (2,)))
    now = StagePlan("now", (4,), c2psa=QuantSpec(kind="bitlinear_standard"))
    install_stage(model, now)
    trainer = SimpleNamespace(model=model, plan=SimpleNamespace(stage=now), stage_paths=stage_paths(model, now))
    find_state_layers(trainer)
    q = quantized_modules(model)
    current = set(select_convs(model, (4,), False)) | set(c2psa_convs(model))
    by_id = {id(m): p for p, m in q.items()}
    assert {by_id[id(m)] for m in trainer.training_state.coded["current"]} == current
    assert {by_id[id(m)] for m in trainer.training_state.coded["earlier"]} == set(q) - current
    assert set(select_convs(model, (2,), False)) == set(q) - current
    # BitLinear_Standard has codes but no learned scales
    assert len(trainer.training_state.scaled["current"]) == len(select_convs(model, (4,), False))


TRAIN = textwrap.dedent("""
    import sys
    from dataclasses import asdict
    from ultralytics.utils import SETTINGS
    from yolo_tq.plan import OptimPlan, StagePlan, TrainPlan
    from yolo_tq.train.trainer import TTQTrainer

    SETTINGS.update({"tensorboard": True})  # in this run's own YOLO_CONFIG_DIR
    start, data, project = sys.argv[1:]
    plan = TrainPlan(StagePlan("now", (4,)), OptimPlan(scale_lr=0.002, scale_weight_decay=0.0))
    TTQTrainer(overrides=dict(model=start, data=data, project=project, name="run", epochs=2, batch=4, imgsz=64,
                              optimizer="AdamW", lr0=0.01, warmup_epochs=0, workers=0, device="cpu", plots=False,
                              val=False, nbs=4, mosaic=0.0, close_mosaic=0, ttq=asdict(plan))).train()
    """)


def test_tiny_training_logs_state_to_results_csv_and_tensorboard(tmp_path, tiny_fp_checkpoint, tiny_data):
    """Two epochs with val=False (the first not validated, the last validated), TensorBoard on through Ultralytics'
    settings, in a fresh interpreter: Ultralytics' logger callbacks stay off while pytest runs."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from yolo_tq.io import load_model, save_stock_checkpoint

    model, _ = load_model(tiny_fp_checkpoint)
    install_stage(model, StagePlan("earlier", (2,)))
    start = save_stock_checkpoint(model, tmp_path / "start.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS")}
    env.update(YOLO_CONFIG_DIR=str(tmp_path / "settings"), YOLO_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", TRAIN, str(start), str(tiny_data), str(tmp_path / "runs")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [f"ttq/{g}/{k}" for g in ("current", "earlier") for k in STAT_NAMES]
    assert len(rows) == 2 and list(rows[0])[-len(keys):] == keys
    for row in rows:
        values = {k: float(row[k]) for k in keys}
        assert all(math.isfinite(v) for v in values.values()), values
        for g in ("current", "earlier"):
            assert 0 < values[f"ttq/{g}/wp_min"] <= values[f"ttq/{g}/wp_mean"] <= values[f"ttq/{g}/wp_max"]
            assert 0 < values[f"ttq/{g}/zeros"] < 1 and 0 <= values[f"ttq/{g}/flips"] < 1
    assert float(rows[0]["ttq/current/flips"]) > 0  # AdamW at 0.01 moves some latent weights across Δ
    events = list(run.glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in run.iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"])
    for k in keys:
        logged = {e.step: e.value for e in acc.Scalars(k)}
        assert sorted(logged) == [1, 2], (k, logged)
        for epoch, row in enumerate(rows, start=1):
            assert logged[epoch] == pytest.approx(float(row[k]), rel=1e-4, abs=1e-7), (k, epoch)
