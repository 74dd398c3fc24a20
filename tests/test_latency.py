"""latency_benchmark.py and yolo_tq.deploy: statistics, timing loop, agreement check, exports, skip lines, typed
results. Runs without ../shared and without a GPU; OpenVINO tests skip when it is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, build_model, c2psa_plan, progressive_stage_plans, run_here

from yolo_tq.deploy import backends
from yolo_tq.deploy.backends import reference_outputs
from yolo_tq.deploy.bench import BenchError, BenchOptions, run_benchmark
from yolo_tq.deploy.deployable import export_artifact, prepare_checkpoint
from yolo_tq.deploy.measure import (PerfCounterClock, latency_stats, peak_rss_mb, ratios, reset_peak_rss,
                                    time_interleaved)
from yolo_tq.deploy.results import (SCHEMA, ABResult, Interleaved, Memory, Skip, TargetRow, WorkerSpec, format_table,
                                    load_arrays, progress_line, save_arrays, save_record)
from yolo_tq.deploy.worker import measure
from yolo_tq.eval.agreement import (FP32_BOX_TOL_PX, AgreementError, compare_outputs, f1_score, found_share,
                                   match_detections, output_diffs, verdict)
from yolo_tq.eval.fused import channelwise_ternary, int8_rounding_error
from yolo_tq.io import load_model, save_stock_checkpoint
from yolo_tq.quant.apply import export_ternary, install_stage, quantized_modules, ternarize_

IMGSZ = 64


# ------------------------------------------------------------------------------------------------------- fixtures
def _ttq_model(seed: int = 1):
    """yolo11n (nc=2) from yaml with TTQ installed in the stage 1-3 layers of configs/stage1_progressive.yaml."""
    torch.manual_seed(seed)
    model = build_model("yolo11n.yaml", nc=2)
    model.names, model.args = {0: "c0", 1: "c1"}, {"imgsz": IMGSZ}
    ternarize_(model, progressive_stage_plans())
    return model


@pytest.fixture(scope="module")
def ternary_checkpoint(tmp_path_factory):
    """A stock ternary yolo11n (nc=2) built from yaml: plain convs holding three values in the stage 1-3 layers."""
    return save_stock_checkpoint(export_ternary(_ttq_model()), tmp_path_factory.mktemp("tern") / "ternary.pt")


@pytest.fixture(scope="module")
def ttq_training_checkpoint(tmp_path_factory):
    """A checkpoint that still holds TTQConv2d modules (as training writes them)."""
    return save_stock_checkpoint(_ttq_model(seed=2), tmp_path_factory.mktemp("ttq") / "last.pt")


@pytest.fixture(scope="module")
def inputs_and_dir(tmp_path_factory, tiny_data):
    from yolo_tq.eval.agreement import check_inputs

    d = tmp_path_factory.mktemp("deploy")
    xs = check_inputs(str(tiny_data), IMGSZ, 1, 2)
    save_arrays(d / "inputs.npz", xs)
    return xs, d


def _spec(name, artifact, d, refs_path, runs=5, warmup=1):
    return WorkerSpec(target=name, models=(("quantized", str(artifact)),), inputs=str(d / "inputs.npz"), batch=1,
                      num_runs=runs, warmup=warmup, refs=str(refs_path), min_agreement=0.9)


# ------------------------------------------------------------------------------------------------ pure functions
def test_latency_stats_known_values():
    s = latency_stats([0.010, 0.020, 0.030, 0.040, 0.100], batch=4)
    assert s.runs == 5
    assert s.mean_ms == pytest.approx(40.0)
    assert s.median_ms == pytest.approx(30.0)
    assert s.p95_ms == pytest.approx(88.0)  # linear interpolation between 40 and 100
    assert s.min_ms == pytest.approx(10.0) and s.max_ms == pytest.approx(100.0)
    assert s.throughput_ips == pytest.approx(4 * 1000 / 40.0)
    with pytest.raises(ValueError):
        latency_stats([])
    with pytest.raises(ValueError):
        latency_stats([0.01], batch=0)


def test_ratios():
    assert ratios({"mean_ms": 2.0}, {"mean_ms": 4.0}) == {"mean_ms": 0.5}
    assert ratios({"mean_ms": 1.0}, {"mean_ms": 0}) == {"mean_ms": None}  # no ratio to a zero baseline
    r = ratios({"mean_ms": 5.0, "file_bytes": 2000, "gpu_mem_mb": None}, {"mean_ms": 10.0, "file_bytes": 2000})
    assert r == {"mean_ms": 0.5, "file_bytes": 1.0}


def test_cycle_ratios_cancel_a_position_bias():
    """Whoever runs second pays 2 ms (another session's threads still busy): per-iteration ratios alternate
    between 1.2 and 0.83 and their median lands on either mode; per rotation cycle the bias cancels."""
    from yolo_tq.deploy.measure import cycle_ratios

    ref = [10.0, 12.0, 10.0, 12.0, 10.0]  # the baseline runs first in iterations 0, 2, 4
    test = [12.0, 10.0, 12.0, 10.0, 12.0]
    assert np.median(np.asarray(test) / np.asarray(ref)) == pytest.approx(1.2)
    assert cycle_ratios(test, ref, 2).tolist() == [1.0, 1.0]  # the unfinished last cycle is left out
    assert cycle_ratios([2.0, 4.0], [1.0, 1.0], 3).tolist() == [2.0, 4.0]  # no full cycle: per iteration
    assert cycle_ratios([3.0, 3.0, 3.0], [1.0, 2.0, 3.0], 3).tolist() == [1.5]
    with pytest.raises(ValueError):
        cycle_ratios([1.0], [1.0, 2.0], 2)


def test_median_interval_and_aa_band():
    from yolo_tq.deploy.measure import median_interval, within_band

    assert median_interval([1.02] * 7) == pytest.approx((1.02, 1.02, 1.02))
    values = [0.9, 0.95, 1.0, 1.0, 1.05, 1.1, 1.3]
    med, lo, hi = median_interval(values)
    assert med == 1.0 and 0.9 <= lo <= med <= hi <= 1.3 and lo < hi
    assert median_interval(values) == (med, lo, hi)  # seeded: a result file can be recomputed exactly
    assert within_band(1.0) and within_band(1.03) and within_band(0.97) and within_band(1.0304)  # reads 1.030
    assert not within_band(1.031) and not within_band(0.9) and not within_band(None)


def test_interleaved_pass_rotates_every_model_through_every_position():
    calls = []
    runs = [lambda i=i: calls.append(i) for i in range(3)]
    samples = time_interleaved(runs, [PerfCounterClock() for _ in range(3)], 3, warmup=1)
    assert calls == [0, 1, 2] + [0, 1, 2, 1, 2, 0, 2, 0, 1] and [len(x) for x in samples] == [3, 3, 3]


def _pass(kind, ratio, status="ok"):
    other = "baseline-copy" if kind == "A/A" else "quantized"
    if status != "ok":
        return ABResult("onnxruntime-cpu", status, "worker exited 1: boom", kind=kind)
    lat = latency_stats([0.01, 0.011])
    return ABResult("onnxruntime-cpu", "ok", clock="perf_counter", kind=kind, stats={"baseline": lat, other: lat},
                    paired_median_ratio={"baseline": 1.0, other: ratio},
                    ratio_interval={"baseline": [1.0, 1.0], other: [ratio - 0.01, ratio + 0.01]})


@pytest.mark.parametrize("aa, ab_status, status, reason", [
    (1.02, "ok", "ok", ""),
    (0.962, "ok", "refused", "A/A check read 0.962 [0.952, 0.972], outside 1.00 ± 0.03"),
    (1.01, "failed", "failed", "A/B pass failed: worker exited 1: boom")])
def test_ab_ratio_counts_only_after_the_aa_check(monkeypatch, aa, ab_status, status, reason):
    """The A/A pass times the baseline against a second copy of its own export; the A/B ratio is accepted only
    when the A/A reads 1.00 ± 0.03, else it is refused with the A/A figure as the reason."""
    from yolo_tq.deploy import bench, results

    seen = []

    def fake_pass(t, models, kind, o, work, folder=None, **kw):
        seen.append((kind, [m for m, _ in models], [a for _, a in models]))
        return _pass(kind, aa) if kind == "A/A" else _pass(kind, 0.95, ab_status)

    monkeypatch.setattr(bench, "_time", fake_pass)
    head = dict(target="onnxruntime-cpu", family="onnxruntime", device="cpu", precision="fp32", status="failed",
                reason="x")
    pair = [TargetRow(model="baseline", artifact="b.onnx", **head), TargetRow(model="quantized", artifact="q.onnx",
                                                                              **head)]
    lines = []
    i = bench._interleave(backends.target("onnxruntime-cpu"), pair, BenchOptions(baseline="b"), REPO, lines.append)
    assert seen == [("A/A", ["baseline", "baseline-copy"], ["b.onnx", "b.onnx"]),
                    ("A/B", ["baseline", "quantized"], ["b.onnx", "q.onnx"])]
    assert i.status == status and i.reason.startswith(reason) and len(lines) == 1
    assert i.ratio() == ((0.95, 0.94, 0.96) if status == "ok" else None)
    assert Interleaved.from_dict(json.loads(json.dumps(asdict(i)))) == i
    if status == "ok":
        assert results.interleaved_ratios(i)["aa_paired_median"] == aa


def test_device_default_follows_cuda(monkeypatch):
    """No --device: the GPU when PyTorch sees one (then the CUDA targets), else the CPU, as Ultralytics picks;
    the README's command (no --device, --export-fp16 --export-int8) then times the CUDA targets on a GPU."""
    from yolo_tq.commands import latency as cmd
    from yolo_tq.deploy.bench import _plan, normalize_device

    p = __import__("argparse").ArgumentParser()
    cmd.add_arguments(p)
    a = p.parse_args(["--baseline", "yolo11n.pt", "--quantized", "t.pt", "--export-fp16", "--export-int8",
                      "--num-runs", "30"])
    assert a.device is None
    monkeypatch.setattr(backends, "importable", lambda m: m != "tensorrt")
    for seen, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(backends, "cuda_available", lambda seen=seen: seen)
        assert normalize_device(a.device) == want and normalize_device("cpu") == "cpu"
        assert normalize_device("0") == "cuda"
        runnable, skipped = _plan(BenchOptions(baseline="b", export_fp16=True, export_int8=True, device=want),
                                  lambda line: None)
        devices = {t.device for t in runnable}
        assert devices == {want}
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    runnable, skipped = _plan(BenchOptions(baseline="b", export_fp16=True, export_int8=True, device="cuda"),
                              lambda line: None)
    assert {"torch-cuda", "torch-cuda-fp16"} <= {t.name for t in runnable}  # onnxruntime-cuda: onnxruntime-gpu
    assert {s.target: s.reason for s in skipped}["tensorrt-int8"].startswith("INT8 calibration needs images")
    with pytest.raises(BenchError):
        normalize_device("1")


def test_timing_loop_counts_warmup_and_samples():
    calls = []

    class FakeClock:
        name = "fake"

        def __init__(self):
            self.t = 0.0

        def start(self):
            self.t0 = self.t

        def stop(self):
            self.t += 0.25
            return self.t - self.t0

    [samples] = time_interleaved([lambda: calls.append(1)], [FakeClock()], num_runs=7, warmup=3)
    assert len(calls) == 10 and samples == [0.25] * 7
    [samples] = time_interleaved([lambda: None], [PerfCounterClock()], 4)
    assert len(samples) == 4 and all(s >= 0 for s in samples)
    with pytest.raises(ValueError):
        time_interleaved([lambda: None], [PerfCounterClock()], 0)


def test_output_diffs_and_confident_anchors():
    ref = np.zeros((1, 6, 4), np.float32)
    ref[0, 4, 1] = 0.9  # anchor 1 is confident
    out = ref.copy()
    out[0, 0, 1] += 0.5  # box error on the confident anchor
    out[0, 1, 3] += 30.0  # large box error on an anchor nobody detects
    d = output_diffs(ref, out)
    assert d["max_abs"] == pytest.approx(30.0) and d["max_abs_box"] == pytest.approx(30.0)
    assert d["confident_anchors"] == 1 and d["max_abs_box_confident"] == pytest.approx(0.5)
    assert d["max_abs_score"] == 0.0
    with pytest.raises(AgreementError):
        output_diffs(ref, out[:, :, :3])


def test_detection_matching_and_verdicts():
    ref = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1]], np.float32)
    same = ref.copy()
    wrong_class = ref.copy()
    wrong_class[1, 5] = 0
    assert match_detections(ref, same) == 2
    assert match_detections(ref, wrong_class) == 1
    assert match_detections(ref, np.zeros((0, 6), np.float32)) == 0
    two_on_one = np.array([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 9, 0.8, 0]], np.float32)
    assert match_detections(ref, two_on_one) == 1 and match_detections(ref, two_on_one[::-1]) == 1  # one-to-one
    assert match_detections(ref, ref + np.array([6, 0, 6, 0, 0, 0], np.float32)) == 0  # IoU 0.25 < 0.5
    assert f1_score(1, 2, 2) == pytest.approx(0.5) and f1_score(0, 0, 0) == 1.0
    diffs = {"max_abs_box": FP32_BOX_TOL_PX / 2, "max_abs_score": 0.0}
    assert verdict("fp32", diffs, 0.0).passed
    assert not verdict("fp32", {**diffs, "max_abs_box": 1.0}, 1.0).passed
    assert verdict("int8", {**diffs, "max_abs_box": 100.0}, 0.95).passed  # int8 is judged by detections
    assert not verdict("int8", diffs, 0.5).passed
    # a model that rounds its activations (BitLinear): FP32 exports flip codes at .5 boundaries, judged by detections
    flipped = {"max_abs_box": 1.45, "max_abs_score": 2e-3}
    assert not verdict("fp32", flipped, 1.0).passed
    v = verdict("fp32", flipped, 1.0, activation_rounding=True)
    assert v.passed and v.criterion.startswith("fp32 with rounded activations")
    assert not verdict("fp32", diffs, 0.5, activation_rounding=True).passed  # a lost detection still fails


def test_detection_agreement_ignores_score_jitter_at_the_threshold():
    """Hysteresis: a sure detection (>= 0.35) must be found at >= 0.15; one scoring 0.30 need not be found."""
    from yolo_tq.eval.agreement import CONF_LOOSE, CONF_SURE

    box = [0, 0, 10, 10]
    sure_ref = np.array([box + [0.9, 0]], np.float32)
    jitter_ref = np.array([[20, 20, 30, 30, 0.30, 1]], np.float32)
    assert CONF_LOOSE < 0.30 < CONF_SURE
    both_ref = [np.concatenate([sure_ref, jitter_ref])]
    out_keeps_sure = [np.array([box + [0.8, 0]], np.float32)]  # lost the 0.30 one: fine
    loose_out_keeps = out_keeps_sure
    sure = lambda ds: [d[d[:, 4] >= CONF_SURE] for d in ds]  # noqa: E731
    assert found_share(sure(both_ref), loose_out_keeps, sure(out_keeps_sure), both_ref) == (2, 2)
    lost = [np.zeros((0, 6), np.float32)]  # lost the sure one: a real disagreement
    assert found_share(sure(both_ref), lost, sure(lost), both_ref) == (0, 1)


def test_int8_representation_of_ternary_weights():
    torch.manual_seed(0)
    signs = torch.randint(-1, 2, (8, 4, 3, 3)).float()
    scale = torch.rand(8, 1, 1, 1) + 0.5
    symmetric = signs * scale
    assert channelwise_ternary(symmetric)
    assert int8_rounding_error(symmetric) == pytest.approx(0.0, abs=1e-7)
    asym = torch.where(signs > 0, signs * 0.7, signs * 0.3) * scale  # TTQ: Wp != Wn
    assert channelwise_ternary(asym)
    assert 0 < int8_rounding_error(asym) <= 0.5 / 127 + 1e-6
    dense = torch.randn(8, 4, 3, 3)
    assert not channelwise_ternary(dense)
    assert int8_rounding_error(dense) <= 0.5 / 127 + 1e-6


# ---------------------------------------------------------------------------------- checkpoints and ONNX exports
def test_prepare_checkpoint_kinds(tmp_path, tiny_fp_checkpoint, ternary_checkpoint, ttq_training_checkpoint):
    fp = prepare_checkpoint(tiny_fp_checkpoint, tmp_path / "a", "baseline")
    assert fp.kind == "fp" and fp.summary["deploy"]["ternary_convs"] == 0
    assert fp.checkpoint.is_symlink() and fp.checkpoint.resolve() == tiny_fp_checkpoint.resolve()
    tern = prepare_checkpoint(ternary_checkpoint, tmp_path / "b", "quantized")
    assert tern.kind == "ternary" and tern.summary["ternary_convs"] > 20
    assert not fp.summary["activation_rounding"] and not tern.summary["activation_rounding"]
    # after Conv+BN fusion the ternary convs stay ternary per output channel
    assert tern.summary["deploy"]["ternary_convs"] == tern.summary["ternary_convs"]
    ttq = prepare_checkpoint(ttq_training_checkpoint, tmp_path / "c", "quantized")
    assert ttq.kind == "ttq-training" and ttq.summary["quantized_modules_in_checkpoint"] > 20
    assert ttq.summary["quantized_modules_kept"] == [] and not ttq.checkpoint.is_symlink()
    model, _ = load_model(ttq.checkpoint)
    assert not quantized_modules(model) and ttq.summary["ternary_convs"] == tern.summary["ternary_convs"]


@pytest.mark.parametrize("which", ["baseline", "ternary"])
def test_onnx_export_matches_pytorch(which, tmp_path, tiny_fp_checkpoint, ternary_checkpoint, inputs_and_dir):
    xs, d = inputs_and_dir
    ckpt = tiny_fp_checkpoint if which == "baseline" else ternary_checkpoint
    pm = prepare_checkpoint(ckpt, tmp_path, which)
    path, _ = export_artifact(pm, "onnx", tmp_path, IMGSZ, 1)
    assert path.suffix == ".onnx" and path.parent == tmp_path / "onnx" and path.stat().st_size > 100_000
    import onnx

    graph = onnx.load(str(path)).graph
    assert [tuple(dd.dim_value for dd in i.type.tensor_type.shape.dim) for i in graph.input] == [(1, 3, IMGSZ, IMGSZ)]
    refs = reference_outputs(pm.checkpoint, xs)
    assert refs[0].shape == (1, 4 + 2, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2)
    save_arrays(tmp_path / "refs.npz", refs)
    row = measure(_spec("onnxruntime-cpu", path, d, tmp_path / "refs.npz"))
    assert row.status == "ok", row.reason
    a, lat = row.agreement, row.latency
    assert a.passed and a.max_abs_box <= FP32_BOX_TOL_PX and a.max_abs_score <= 1e-3
    assert lat.runs == 5 and 0 < lat.min_ms <= lat.median_ms <= lat.p95_ms <= lat.max_ms
    assert lat.throughput_ips == pytest.approx(1000.0 / lat.mean_ms)
    assert row.memory.peak_rss_mb > 0 and row.clock == "perf_counter"


def test_bitlinear_checkpoint_exports_and_agrees(tmp_path, inputs_and_dir):
    """A training checkpoint with BitLinear_TTQ in C2PSA (kept as is: it has no plain-conv export) plus TTQ convs."""
    xs, d = inputs_and_dir
    model = _ttq_model(seed=3)
    assert install_stage(model, c2psa_plan("bitlinear_ttq"))
    pm = prepare_checkpoint(save_stock_checkpoint(model, tmp_path / "bitlinear.pt"), tmp_path, "quantized")
    assert pm.kind == "ttq-training" and pm.summary["quantized_modules_kept"] == ["BitLinear_TTQ"]
    assert pm.summary["activation_rounding"]
    refs = reference_outputs(pm.checkpoint, xs)
    save_arrays(tmp_path / "refs.npz", refs)
    path, _ = export_artifact(pm, "onnx", tmp_path, IMGSZ, 1)
    spec = replace(_spec("onnxruntime-cpu", path, d, tmp_path / "refs.npz", runs=2), activation_rounding=True)
    row = measure(spec)
    assert row.status == "ok" and row.agreement.passed and row.agreement.criterion.startswith("fp32 with rounded")
    # one flipped activation code moves boxes by ~1 px (1.45 px on the pipeline's model); judged by detections
    # such an export is timed, while a model without rounding is held to the FP32 tolerance
    refs[0][:, :4] += 1.45
    save_arrays(tmp_path / "moved.npz", refs)
    moved = replace(spec, refs=str(tmp_path / "moved.npz"))
    assert measure(moved).status == "ok"
    assert measure(replace(moved, activation_rounding=False)).status == "refused"


def test_disagreeing_export_is_refused_not_timed(tmp_path, tiny_fp_checkpoint, inputs_and_dir):
    xs, d = inputs_and_dir
    pm = prepare_checkpoint(tiny_fp_checkpoint, tmp_path, "baseline")
    refs = reference_outputs(pm.checkpoint, xs)
    refs[0][:, :4] += 1.0  # pretend PyTorch put every box one pixel elsewhere
    save_arrays(tmp_path / "refs.npz", refs)
    row = measure(_spec("torch-cpu", pm.checkpoint, d, tmp_path / "refs.npz"))
    assert row.status == "refused" and row.latency is None and not row.agreement.passed
    assert row.agreement.max_abs_box == pytest.approx(1.0, abs=0.01) and "disagrees" in row.reason


def test_timing_loop_on_tiny_model(tiny_fp_checkpoint):
    runner = backends.target("torch-cpu").runner(tiny_fp_checkpoint)
    [samples] = time_interleaved([runner.bind(np.zeros((1, 3, IMGSZ, IMGSZ), np.float32))], [runner.clock()], 12, 2)
    s = latency_stats(samples)
    assert s.runs == 12 and 0 < s.min_ms <= s.median_ms <= s.p95_ms <= s.max_ms < 5000


# ------------------------------------------------------------------------------------------------ skips and JSON
def test_missing_backends_give_one_skip_line(monkeypatch):
    real = backends.importable
    monkeypatch.setattr(backends, "importable", lambda m: False if m in ("openvino", "tensorrt", "nncf") else real(m))
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    def plan_targets(device, fp16, int8, data):
        o = BenchOptions(baseline="b", quantized="q", device=device, export_fp16=fp16, export_int8=int8, data=data)
        return {t.name: t.skip_reason(o) for t in backends.TARGETS}

    plan = plan_targets("cpu", True, True, "data.yaml")
    assert plan["torch-cpu"] is None and plan["onnxruntime-cpu"] is None
    for name in ("openvino-fp32", "openvino-int8"):
        assert "not installed" in plan[name] and "pip install" in plan[name]
    assert "--device 0" in plan["tensorrt-fp16"]
    gpu = plan_targets("cuda", True, True, "data.yaml")
    assert "no CUDA device" in gpu["torch-cuda"] and "--device cpu" in gpu["torch-cpu"]
    no_flags = plan_targets("cpu", False, False, None)
    assert "--export-int8" in no_flags["openvino-int8"] and "--export-fp16" in no_flags["openvino-bf16"]
    assert "--data" in plan_targets("cpu", False, True, None)["openvino-int8"]
    line = Skip("tensorrt-int8", plan["tensorrt-int8"]).line()
    assert line.startswith("skip tensorrt-int8: ") and "\n" not in line


def test_run_benchmark_result(tmp_path, tiny_fp_checkpoint, ternary_checkpoint, tiny_data, monkeypatch):
    monkeypatch.setattr(backends, "importable",
                        lambda m, real=backends.importable: False if m in ("openvino", "tensorrt") else real(m))
    lines = []
    opts = BenchOptions(baseline=str(tiny_fp_checkpoint), quantized=str(ternary_checkpoint), num_runs=3, warmup=1,
                        imgsz=IMGSZ, data=str(tiny_data), export_int8=True, backends=("torch", "onnxruntime", "openvino"),
                        workdir=str(tmp_path / "w"), isolate=False, check_images=2, device="cpu")
    r = run_benchmark(opts, log=lines.append)
    assert [(x.model, x.target, x.status) for x in r.rows] == [
        ("baseline", "torch-cpu", "ok"), ("quantized", "torch-cpu", "ok"),
        ("baseline", "onnxruntime-cpu", "ok"), ("quantized", "onnxruntime-cpu", "ok"),
        ("baseline", "onnxruntime-cpu-deploy", "ok"), ("quantized", "onnxruntime-cpu-deploy", "ok")]
    assert all(x.latency.runs == 3 and x.agreement.passed for x in r.rows)
    rows = {(x.model, x.target): x for x in r.rows}  # the deploy target: the baseline's FP ONNX, the quantized
    assert rows["baseline", "onnxruntime-cpu-deploy"].artifact == rows["baseline", "onnxruntime-cpu"].artifact
    assert rows["quantized", "onnxruntime-cpu-deploy"].file_mb < 0.3 * rows["baseline", "onnxruntime-cpu"].file_mb
    skipped = {s.target: s.reason for s in r.skipped}
    assert "not installed" in skipped["openvino-int8"] and "not in --backends" in skipped["tensorrt-int8"]
    assert "a CUDA target" in skipped["torch-cuda"]
    assert set(skipped) | {"torch-cpu", "onnxruntime-cpu", "onnxruntime-cpu-deploy"} == {t.name for t in backends.TARGETS}
    assert sum(line.startswith("skip ") for line in lines) == len(skipped)
    assert {(c.quantized, c.baseline) for c in r.comparisons} == {
        ("torch-cpu", "torch-cpu"), ("onnxruntime-cpu", "onnxruntime-cpu"),
        ("onnxruntime-cpu-deploy", "onnxruntime-cpu-deploy"), ("onnxruntime-cpu-deploy", "torch-cpu"),
        ("onnxruntime-cpu-deploy", "onnxruntime-cpu")}
    # each target: the A/A check, then the A/B pass; 3 runs of a tiny model on a busy CPU may or may not pass the A/A
    assert [i.target for i in r.interleaved] == ["torch-cpu", "onnxruntime-cpu", "onnxruntime-cpu-deploy"]
    for i in r.interleaved:
        assert (i.aa.kind, i.aa.status, i.ab.kind, i.ab.status) == ("A/A", "ok", "A/B", "ok")
        assert set(i.aa.stats) == {"baseline", "baseline-copy"} and set(i.ab.stats) == {"baseline", "quantized"}
        assert all(s.runs == 3 for p in (i.aa, i.ab) for s in p.stats.values())
        assert i.ab.paired_median_ratio["baseline"] == 1.0 and i.ab.ratio_interval["baseline"] == [1.0, 1.0]
        med, lo, hi = i.aa_ratio()
        # the A/A counts as it is reported, at 3 decimals (1.0304 reads 1.030: inside the band)
        assert lo <= med <= hi and (i.status == "ok") == (abs(round(med, 3) - 1) <= 0.03 + 1e-12)
        c = next(c for c in r.comparisons if c.quantized == i.target)
        assert (c.interleaved_ratios is not None) == (i.status == "ok")
        if i.status == "ok":
            assert c.interleaved_ratios["paired_median"] == i.ratio()[0] and c.interleaved_ratios["aa_paired_median"] == med
        else:
            assert i.status == "refused" and i.reason.startswith(f"A/A check read {med:.3f}")
    c = r.comparisons[0].ratios
    assert c["file_bytes"] == pytest.approx(1.0, rel=0.05) and c["file_gz_bytes"] < 1.0  # same size dense, compresses better
    assert r.models["quantized"].kind == "ternary" and r.environment.loadavg_after
    d = json.loads(Path(save_record(r, tmp_path / "r.json")).read_text())  # --json's file rebuilds the same records
    assert d["models"]["quantized"]["checkpoint"] == str(r.models["quantized"].checkpoint)
    assert d["schema"] == SCHEMA and d["options"]["num_runs"] == 3
    assert [TargetRow.from_dict(x) for x in d["rows"]] == r.rows
    assert [Interleaved.from_dict(a) for a in d["interleaved"]] == r.interleaved
    for x in r.rows:  # each row's progress line as it was timed: its table cells after their headers
        assert progress_line(x) in lines and f"mean ms {x.latency.mean_ms:.2f}  median" in progress_line(x)
    table = format_table(r)
    assert "onnxruntime-cpu / onnxruntime-cpu" in table and "skip tensorrt-int8:" in table and "A/A copy" in table
    with pytest.raises(BenchError):
        run_benchmark(BenchOptions(baseline=str(tiny_fp_checkpoint), imgsz=50), log=lines.append)


def test_machine_facts():
    from importlib import metadata

    from yolo_tq.machine import CPU_FLAGS, cpu_features, cpu_identity, importable, module_versions, package_versions

    assert package_versions(("numpy", "no-such-distribution")) == {"numpy": metadata.version("numpy")}
    assert importable("numpy") and not importable("no_such_module") and not importable("numpy..bad")
    assert module_versions(("numpy", "no_such_module")) == {"numpy": np.__version__, "no_such_module": None}
    assert set(cpu_features()) == set(CPU_FLAGS)
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert cpu_identity()["model name"] and set(cpu_identity()) <= {"model name", "cpu family", "model", "stepping",
                                                                         "microcode"}


def test_progress_lines_show_the_table_cells_and_why_not_ok():
    agrees, disagrees = (compare_outputs([np.zeros((1, 6, 4), np.float32)], [np.full((1, 6, 4), d, np.float32)],
                                         "fp32") for d in (0.0, 1.45))
    common = dict(model="quantized", target="onnxruntime-cpu", family="onnxruntime", device="cpu", precision="fp32")
    ok = TargetRow(**common, status="ok", clock="perf_counter", agreement=agrees, latency=latency_stats([0.02, 0.03]),
                   memory=Memory(peak_rss_mb=512.4), file_bytes=1_994_999, file_gz_bytes=1_004_999)
    assert progress_line(ok) == ("quantized onnxruntime-cpu   prec fp32  status ok  max|Δ| 0  agree 1.00  mean ms 25.00  "
                                 "median 25.00  p95 29.50  img/s 40.0  mem MiB 512  file MB 1.99  gz MB 1.00  mAP -")
    refused = TargetRow(**common, status="refused", reason="disagrees with PyTorch", agreement=disagrees)
    assert progress_line(refused).endswith("mean ms -  median -  p95 -  img/s -  mem MiB -  file MB -  gz MB -  mAP -; "
                                           "refused: disagrees with PyTorch")


def test_rows_cannot_be_built_wrong():
    ref = np.zeros((1, 6, 4), np.float32)
    agrees, disagrees = (compare_outputs([ref], [ref + d], "fp32") for d in (0.0, 1.0))
    assert agrees.passed and not disagrees.passed
    head = dict(model="baseline", target="torch-cpu", family="torch", device="cpu", precision="fp32")
    ok = TargetRow(**head, status="ok", clock="perf_counter", agreement=agrees, latency=latency_stats([0.01, 0.02]),
                   memory=Memory(peak_rss_mb=100.0))
    assert ok.figures()["mean_ms"] == pytest.approx(15.0) and ok.figures()["peak_rss_mb"] == 100.0
    for wrong in ({"status": "done"}, {"latency": None}, {"reason": "why"}, {"agreement": disagrees},
                  {"memory": None}, {"clock": ""}, {"status": "failed", "reason": "x"}):
        with pytest.raises(ValueError):
            replace(ok, **wrong)
    with pytest.raises(ValueError):
        TargetRow(**head, status="failed")  # without a reason
    with pytest.raises(ValueError):
        TargetRow(**head, status="refused", reason="x", agreement=agrees)  # refused although it agreed
    refused = TargetRow(**head, status="refused", reason="disagrees", agreement=disagrees)
    assert TargetRow.from_dict(json.loads(json.dumps(asdict(refused)))) == refused
    with pytest.raises(ValueError):
        ABResult("torch-cpu", "ok")  # no latency
    with pytest.raises(ValueError):
        Skip("tensorrt-int8", "")
    with pytest.raises(TypeError):
        WorkerSpec(**{**asdict(_spec("torch-cpu", "a.pt", REPO, "r.npz")), "runs": 3})  # a key the worker lacks


def test_peak_rss_reset():
    """64 MiB of anonymous memory (mmap, outside malloc's heap, so freeing it surely lowers RSS) raises the peak; after
    freeing it, a reset that reports success must lower the mark, and one that reports failure must not have."""
    import mmap

    if not reset_peak_rss():  # first: an earlier, larger peak of this process would hide the allocation below
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    size = 64 * 2**20
    buf = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):  # touch every page: resident
        buf[offset] = 1
    high = peak_rss_mb()
    buf.close()
    if reset_peak_rss():  # a True must mean the mark really dropped
        assert peak_rss_mb() < high - 32
    else:  # the allocation's peak survived the write: the kernel ignores clear_refs, and the call said so
        assert peak_rss_mb() >= high - 1


def test_peak_reset_detects_an_ignored_write():
    """A kernel that takes the clear_refs write but keeps the old mark must not count as a reset."""
    from yolo_tq.deploy.measure import _peak_follows_rss
    assert _peak_follows_rss(1_000_000, 998_000, 4096)
    assert not _peak_follows_rss(1_199_000, 1_000_000, 4096)  # mark left 195 MB above the current RSS
    assert not _peak_follows_rss(None, 1_000_000, 4096)


def test_arrays_round_trip(tmp_path):
    xs = [np.arange(6, dtype=np.float32).reshape(1, 2, 3), np.ones((2, 2), np.float32)]
    path = save_arrays(tmp_path / "x.npz", xs)
    back = load_arrays(path)
    assert len(back) == 2 and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(xs, back))


def test_cli_end_to_end_isolated(tmp_path, tiny_fp_checkpoint):
    """The root script, one worker process per target (the installed package, run in the work folder), skip lines
    on screen, JSON written."""
    out = tmp_path / "lat.json"
    p = subprocess.run([sys.executable, "latency_benchmark.py", "--baseline", str(tiny_fp_checkpoint),
                        "--backends", "onnxruntime", "--device", "cpu", "--num-runs", "3", "--warmup", "1",
                        "--imgsz", str(IMGSZ), "--workdir", str(tmp_path / "w"), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skip openvino-fp32: not in --backends" in p.stdout and "Traceback" not in p.stdout + p.stderr
    r = json.loads(out.read_text())
    rows = [TargetRow.from_dict(x) for x in r["rows"]]
    assert r["schema"] == SCHEMA and [(x.target, x.status) for x in rows] == [("onnxruntime-cpu", "ok")]
    m = rows[0].memory
    assert rows[0].latency.runs == 3 and m.peak_rss_reset is reset_peak_rss()  # the worker resets it where we can
    assert m.added_rss_mb == pytest.approx(m.peak_rss_mb - m.rss_base_mb) and m.added_rss_mb >= 0
    spec = WorkerSpec(**json.loads((tmp_path / "w" / "baseline" / "onnxruntime-cpu.spec.json").read_text()))
    assert (spec.models[0][0], spec.kind, spec.num_runs, spec.warmup) == ("baseline", "row", 3, 1)
    assert spec.target == "onnxruntime-cpu"
    bad = subprocess.run([sys.executable, "latency_benchmark.py", "--baseline", str(tmp_path / "missing.pt")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: weights not found")


# ---------------------------------------------------------------------------------------------- OpenVINO (optional)
def test_openvino_fp32_and_int8(tmp_path, ternary_checkpoint, tiny_data, inputs_and_dir):
    pytest.importorskip("openvino", reason='OpenVINO not installed (pip install -e ".[deploy]")')
    pytest.importorskip("nncf", reason='NNCF not installed (pip install -e ".[deploy]")')
    xs, d = inputs_and_dir
    pm = prepare_checkpoint(ternary_checkpoint, tmp_path, "quantized")
    save_arrays(tmp_path / "refs.npz", reference_outputs(pm.checkpoint, xs))
    fp32, _ = export_artifact(pm, "openvino", tmp_path, IMGSZ, 1)
    row = measure(_spec("openvino-fp32", fp32, d, tmp_path / "refs.npz"))
    assert row.status == "ok", row.reason
    assert row.inference_precision == "f32" and row.agreement.max_abs_box <= FP32_BOX_TOL_PX
    int8, _ = export_artifact(pm, "openvino-int8", tmp_path, IMGSZ, 1, data=str(tiny_data))
    assert int8.name.endswith("_int8_openvino_model") and "FakeQuantize" in next(int8.glob("*.xml")).read_text()
    row = measure(_spec("openvino-int8", int8, d, tmp_path / "refs.npz"))
    # a ternary model loses nothing to per-channel INT8 weights: its INT8 export must agree, and is then timed
    assert row.status == "ok", row.reason
    assert row.agreement.passed and row.agreement.criterion.startswith("int8") and row.latency.runs == 5
    assert row.agreement.max_abs_score < 0.01  # this untrained model detects nothing: compare its raw scores too


# ------------------------------------------------------------------------------------- the pipeline's INT8 reference
def test_int8_reference_without_deploy_extras(tmp_path, tiny_fp_checkpoint, tiny_data, monkeypatch):
    monkeypatch.setattr(backends, "importable", lambda m, real=backends.importable: m != "openvino" and real(m))
    out = tmp_path / "int8_reference.json"
    r = run_here("yolo-tq", "int8-reference", "--weights", tiny_fp_checkpoint, "--data", tiny_data, "--imgsz",
                 IMGSZ, "--workdir", tmp_path / "w", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["status"] == "skipped" and r["reason"].startswith("OpenVINO is not installed") and "[deploy]" in r["reason"]
    assert not (tmp_path / "w").exists()  # nothing exported


def test_int8_reference_measures_ultralytics_export(tmp_path, tiny_fp_checkpoint, tiny_data, monkeypatch):
    """With the extras: Ultralytics' OpenVINO INT8 export (the exporter replaced here), its size on disk as
    measured, and its mAP and the FP model's from the validator run the same way."""
    from yolo_tq.deploy import deployable, reference

    calls = []

    def fake_export(pm, key, workdir, imgsz, batch, data=None, calib_split="train", *rest, **kw):
        calls.append((key, imgsz, batch, data, calib_split, pm.role))
        folder = workdir / "baseline_int8_openvino_model"
        folder.mkdir(parents=True)
        (folder / "baseline.xml").write_bytes(b"x" * 1000)
        (folder / "baseline.bin").write_bytes(b"w" * 2_345_678)
        return folder, 12.5

    def fake_val(path, data, imgsz, batch, device, **kw):
        calls.append(("val", Path(path).name, batch, device))
        m = 0.301 if "openvino" in str(path) else 0.322
        return {"mAP50": m + 0.1, "mAP50-95": m, "precision": 0.5, "recall": 0.4, "mAP75": 0.0}

    monkeypatch.setattr(reference, "unavailable", lambda data: None)
    monkeypatch.setattr(deployable, "export_artifact", fake_export)
    monkeypatch.setattr(reference, "validate", fake_val)
    r = reference.int8_reference(str(tiny_fp_checkpoint), str(tiny_data), IMGSZ, tmp_path / "w", log=lambda s: None)
    assert calls[0] == ("openvino-int8", IMGSZ, 1, str(tiny_data), "train", "baseline")
    assert calls[1:] == [("val", "baseline_int8_openvino_model", 1, "cpu"), ("val", "baseline.pt", 1, "cpu")]
    assert r["status"] == "ok" and r["bytes"] == 2_346_678 and r["mAP50-95"] == 0.301
    assert r["fp_same_validation"]["mAP50-95"] == 0.322 and r["export_s"] == 12.5


# ----------------------------------------------------------------------------- the original README's INT8 command
def test_int8_without_data_calibrates_on_ultralytics_default(tmp_path, tiny_fp_checkpoint, tiny_data, monkeypatch):
    """`latency_benchmark.py --baseline … --export-int8` with no --data: coco128.yaml, as Ultralytics' INT8 export
    does, with a note line; offline its download failure is one line naming --data (the dataset check is replaced
    here by one that records the call and refuses, as Ultralytics does offline)."""
    import yolo_tq.config as config

    seen = []

    def offline(data, splits=("val",)):
        seen.append((data, splits))
        raise config.ConfigError(f"data {data}: Download failure. Offline, pass a local data yaml: --data /path")

    monkeypatch.setattr(config, "check_dataset", offline)
    r = run_here("latency_benchmark.py", "--baseline", tiny_fp_checkpoint, "--export-int8", "--backends", "onnxruntime")
    assert_one_line_error(r, "coco128.yaml", "--data")
    assert "note: INT8 calibration on coco128.yaml" in r.stdout and seen == [("coco128.yaml", ("train", "val"))]
    monkeypatch.setattr(config, "check_dataset", lambda data, splits=("val",): {"yaml_file": str(tiny_data)})
    from yolo_tq.commands.latency import resolved_data

    assert resolved_data(SimpleNamespace(data="coco128.yaml", export_int8=False)) == str(tiny_data)
    assert resolved_data(SimpleNamespace(data=None, export_int8=False)) is None


def test_a_missing_official_baseline_is_downloaded_or_named(tmp_path, monkeypatch):
    """A bare official name is fetched through Ultralytics, as train.py does; offline, one line names --baseline."""
    import ultralytics.utils.downloads as downloads

    def no_network(name, *a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(downloads, "attempt_download_asset", no_network)
    r = run_here("latency_benchmark.py", "--baseline", "yolo11n.pt", cwd=tmp_path)
    assert_one_line_error(r, "cannot download yolo11n.pt", "--baseline PATH")
