"""Theoretical sizes and ratios, coverage and per-layer rows (yolo_tq.eval.size), on yolo11n built from yaml."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import build_model, c2psa_plan, progressive_stage_plans
from yolo_tq.eval import size as C
from yolo_tq.io import CheckpointError, save_stock_checkpoint
from yolo_tq.quant.apply import export_ternary, install_stage

YOLO11N_PARAMS = 2_624_080
STAGES = progressive_stage_plans()


def test_model_bits_and_ratio_by_hand():
    assert C.model_bits(100, 40, 2, 32) == 40 * 2 + 60 * 32
    paper = C.BUDGETS[0]
    assert C.compression_ratio(100, 100, 40, paper) == pytest.approx(3200 / 2000)
    assert C.compression_ratio(100, 100, 0, paper) == 1.0
    assert C.compression_ratio(100, 100, 100, paper) == 16.0
    log3 = C.BUDGETS[1]
    assert log3.ternary_bits == pytest.approx(1.58496, abs=1e-5)
    assert C.compression_ratio(100, 100, 100, log3) == pytest.approx(32 / math.log2(3))
    fp16 = C.BUDGETS[2]
    assert C.compression_ratio(100, 100, 100, fp16) == 8.0
    with pytest.raises(ValueError):
        C.model_bits(10, 11, 2, 32)


@pytest.fixture(scope="module")
def staged_models():
    """yolo11n (nc=80) from yaml after the stage-1, 1-2 and 1-3 plans, installed with install_stage."""
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", 80)
    fp_counts = C.count(model)
    out = []
    for plan in STAGES:
        install_stage(model, plan)
        out.append(C.count(model))
    return fp_counts, out, model


def test_stage_plans_reproduce_reported_ratios(staged_models):
    fp, stages, _ = staged_models
    assert fp["params"] == YOLO11N_PARAMS and fp["ternary_params"] == 0
    assert [c["ternary_params"] for c in stages] == [647_168, 1_135_616, 1_368_320]
    ratios = [C.compression_ratio(fp["params"], c["params"], c["ternary_params"]) for c in stages]
    assert [round(r, 2) for r in ratios] == [1.30, 1.68, 1.96]
    # the original reports 1.30x, 1.69x, 1.97x
    for r, reported in zip(ratios, (1.30, 1.69, 1.97)):
        assert abs(r - reported) < 0.015


def test_with_c2psa_bitlinear_about_2_13(staged_models):
    import copy

    model = copy.deepcopy(staged_models[2])
    assert len(install_stage(model, c2psa_plan("bitlinear_ttq"))) == 5  # qkv, proj, pe, ffn.0, ffn.1 of the PSABlock
    c = C.count(model)
    assert c["ternary_params"] == 1_368_320 + 115_840
    # + the LayerNorms over each BitLinear's input channels (128, 128, 128, 128, 256); Ap/An are scales, not counted
    assert c["params"] == YOLO11N_PARAMS + 2 * (4 * 128 + 256)
    ratio = C.compression_ratio(YOLO11N_PARAMS, c["params"], c["ternary_params"])
    assert ratio == pytest.approx(2.13, abs=0.005)  # the original reports 2.16x


def test_layer_rows_add_up(staged_models):
    _, stages, model = staged_models
    rows = C.layer_rows(model)
    assert [r["layer"] for r in rows] == list(range(len(model.model)))
    assert sum(r["params"] for r in rows) == stages[-1]["params"]
    assert sum(r["ternary_params"] for r in rows) == stages[-1]["ternary_params"]
    assert sum(r["bits"] for r in rows) == C.model_bits(stages[-1]["params"], stages[-1]["ternary_params"], 2, 32)
    by = {r["layer"]: r for r in rows}
    assert by[10]["ternary_params"] == 0 and by[23]["ternary_params"] == 0 and by[0]["ternary_convs"] == 0
    assert by[3]["ternary_convs"] == 1 and by[22]["ternary_convs"] == by[22]["convs"] == 9
    assert by[11]["params"] == 0


def test_theoretical_sizes_and_coverage(staged_models):
    fp, stages, _ = staged_models
    c = stages[-1]
    sizes = C.theoretical_sizes(fp["params"], c["params"], c["ternary_params"])
    assert [s["budget"] for s in sizes] == [b.name for b in C.BUDGETS]
    paper, log3, half, half_log3 = sizes
    assert paper["baseline_bytes"] == YOLO11N_PARAMS * 4
    assert paper["quantized_bytes"] == (1_368_320 * 2 + (YOLO11N_PARAMS - 1_368_320) * 32) / 8
    assert log3["ratio"] == pytest.approx(YOLO11N_PARAMS * 32 / (1_368_320 * math.log2(3) + 1_255_760 * 32))
    assert half["ratio"] == pytest.approx(YOLO11N_PARAMS * 16 / (1_368_320 * 2 + 1_255_760 * 16))
    assert [round(s["ratio"], 2) for s in sizes] == [1.96, 1.98, 1.84, 1.89]
    assert half_log3["quantized_bytes"] == pytest.approx((1_368_320 * math.log2(3) + 1_255_760 * 16) / 8)
    cov = C.coverage(c)
    assert cov["ternary_param_pct"] == pytest.approx(100 * 1_368_320 / YOLO11N_PARAMS)
    assert cov["ternary_conv_pct"] == pytest.approx(100 * 34 / 88)


def test_stock_ternary_model_keeps_values():
    torch.manual_seed(1)
    model = build_model("yolo11n.yaml", 2)
    install_stage(model, STAGES[0])
    stock = C.stock_ternary_model(model)
    assert stock is not model
    q = model.get_submodule("model.17.conv")
    plain = stock.get_submodule("model.17.conv")
    assert type(plain) is nn.Conv2d and torch.equal(plain.weight, q.weight.detach())
    fp = build_model("yolo11n.yaml", 2)
    assert C.stock_ternary_model(fp) is fp
    assert C.count(stock)["ternary_params"] == C.count(model)["ternary_params"] == 647_168


def test_load_pair_errors(tmp_path, tiny_fp_checkpoint):
    other = build_model("yolo11n.yaml", 3)
    other_path = save_stock_checkpoint(other, tmp_path / "nc3.pt")
    with pytest.raises(CheckpointError, match="not the same architecture"):
        C.load_pair(tiny_fp_checkpoint, other_path)
    with pytest.raises(CheckpointError, match="no ternary or integer-grid weights"):
        C.load_pair(tiny_fp_checkpoint, tiny_fp_checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        C.load_pair(tiny_fp_checkpoint, tmp_path / "missing.pt")


def test_size_report_and_format(tmp_path, tiny_fp_checkpoint):
    from yolo_tq.io import load_model

    model, _ = load_model(tiny_fp_checkpoint)
    install_stage(model, STAGES[0])
    q_path = save_stock_checkpoint(export_ternary(model), tmp_path / "ternary.pt")
    baseline, quantized, stock = C.load_pair(tiny_fp_checkpoint, q_path)
    assert stock is quantized
    rep = C.size_report(baseline, quantized)
    rep["files"] = {"baseline_pt": 1000, "packed": 250}
    text = C.format_size_report(rep)
    assert f"{rep['theoretical'][0]['ratio']:.2f}x" in text and "4.00x" in text
    assert rep["quantized"]["counts"]["ternary_params"] == 647_168
    assert C.stock_export_bytes(q_path, quantized, stock) == q_path.stat().st_size


def test_real_files_and_packed_description(tmp_path, tiny_fp_checkpoint):
    from yolo_tq.formats.packed import write_verified
    from yolo_tq.io import load_model

    model, _ = load_model(tiny_fp_checkpoint)
    install_stage(model, STAGES[0])
    q_path = save_stock_checkpoint(model, tmp_path / "train.pt")  # a training checkpoint: TTQConv2d layers
    baseline, quantized, stock = C.load_pair(tiny_fp_checkpoint, q_path)
    assert stock is not quantized
    packed = C.packed_sizes(stock, "train.pt")
    files = C.real_file_sizes(tiny_fp_checkpoint, q_path, quantized, stock, packed)
    assert files["baseline_pt"] == tiny_fp_checkpoint.stat().st_size
    assert files["packed_ternary_int8_rest"] == len(packed["int8"]) < files["packed_ternary_fp16_rest"] \
        == len(packed["fp16"]) < files["stock_ternary_export_pt"]
    path = tmp_path / "p.safetensors"
    check = write_verified(stock, path, "int8", data=packed["int8"])
    assert path.read_bytes() == packed["int8"] and check["ok"]
    line = C.round_trip_line(path, "int8", check)
    assert f"({len(packed['int8']):,} bytes, rest int8)" in line and f"{check['ternary']}/{check['ternary']} " in line
    d = C.describe_packed(path)
    assert d["bytes"] == len(packed["int8"]) and d["ternary_tensors"] == check["ternary"] > 0
    assert d["source"] == "train.pt" and d["ternary_layers"] == [17, 19, 20, 22] and "yaml" not in d
    assert C.format_packed(d).startswith(f"{path}: {len(packed['int8']):,} bytes, DetectionModel (nc=2), "
                                         f"ternary layers [17, 19, 20, 22]")


def test_original_counting_reproduces_the_original_reports():
    """The original code counted conv weights only and saw no Conv2d in its BitLinear layers (0 bits): its reports
    read 1.30 / 1.69 / 1.97 / 2.16 for yolo11n, and 2.79 (stages 1-3) and 2.94 (+ BitLinear on C2PSA's first
    PSABlock) for yolo11x."""
    from yolo_tq.plan import StagePlan
    from yolo_tq.quant.spec import QuantSpec

    want = {"n": ([1.30, 1.69, 1.97], 2.16), "x": ([None, None, 2.79], 2.94)}
    for size, (stages, with_c2psa) in want.items():
        torch.manual_seed(0)
        base = build_model(f"yolo11{size}.yaml", 80)
        base_bits = C.original_conv_bits(base)
        q = build_model(f"yolo11{size}.yaml", 80)
        q.load_state_dict(base.state_dict())
        for plan, ratio in zip(STAGES, stages):
            install_stage(q, plan)
            if ratio is not None:
                assert base_bits / C.original_conv_bits(export_ternary(q)) == pytest.approx(ratio, abs=0.005), size
        install_stage(q, StagePlan("c2psa", (), c2psa=QuantSpec(kind="bitlinear_ttq"), c2psa_blocks="first"))
        o = C.original_ratio(base, export_ternary(q))
        assert o["ratio"] == pytest.approx(with_c2psa, abs=0.005) and o["ratio_bitlinear_at_2_bits"] < o["ratio"]
