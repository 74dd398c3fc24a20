"""Integer-grid (LSQ) weights wherever a ternary layer goes: the 2- and 4-bit codes against hand-worked values, the
grid found from the weights alone (before and after Conv+BN fusion), the packed file's exact round trip, the
per-layer listing and bit counting, and the deployable ONNX decoding them in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, build_model, progressive_stage_plans, run_here
from yolo_tq.eval.layers import conv_rows, totals
from yolo_tq.eval.size import model_bits
from yolo_tq.formats import deploy_onnx as dx
from yolo_tq.formats.codes import decode_grid, grid_codes, pack_bits, unpack_bits
from yolo_tq.formats.layout import entry_kinds
from yolo_tq.formats.packed import pack_state, write_verified
from yolo_tq.plan import StagePlan
from yolo_tq.quant.apply import export_ternary, install_stage
from yolo_tq.quant.spec import QuantSpec


def test_pack_bits_by_hand():
    # 4 bits: codes + 8, first code in the low nibble: (-8, 7) -> 0 | 15 << 4; (0, 1) -> 8 | 9 << 4
    assert pack_bits(torch.tensor([-8, 7, 0, 1]), 4).tolist() == [0xF0, 0x98]
    # 2 bits: codes + 2, four per byte; a missing code pads as 0 (stored 2)
    assert pack_bits(torch.tensor([-2, -1, 0, 1, 1]), 2).tolist() == [0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 2 << 4 | 2 << 6]
    codes = torch.randint(-8, 8, (1001,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(codes, 4), 1001, 4), codes.to(torch.int8))
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([2]), 2)


def test_grid_found_from_the_weights_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.0, 1.5],     # step 0.5, codes 1, -2, 0, 3 -> 3 bits -> stored at 4
                      [0.0, 0.0, 0.0, 0.0],      # all zero: step 0
                      [-0.3, 0.3, 0.0, -0.6]])   # step 0.3, codes -1, 1, 0, -2
    codes, steps, bits = grid_codes(w)
    assert bits == 4 and codes.tolist() == [[1, -2, 0, 3], [0, 0, 0, 0], [-1, 1, 0, -2]]
    assert torch.allclose(steps, torch.tensor([0.5, 0.0, 0.3]))
    assert torch.allclose(decode_grid(codes, steps), w, rtol=1e-6, atol=0)
    assert grid_codes(w, widths=(2, 3, 4))[2] == 3
    assert grid_codes(w[2:])[2] == 2  # codes -2..1 fit 2 bits
    assert grid_codes(torch.tensor([[0.1, 0.25, 0.7]])) is None  # not on a small grid
    assert grid_codes(torch.tensor([[1.0, 9.0]])) is None  # 9 steps of 1 is beyond 4 bits
    assert grid_codes(torch.randn(8, 4, 3, 3)) is None  # float weights


def int_model(bits: int):
    """A yolo11n-yaml model with stage 1's layers (TTQ) and stage 3's layers in `bits`-bit LSQ, exported stock."""
    torch.manual_seed(0)
    model = build_model(nc=2)
    ttq, _, early = progressive_stage_plans()
    install_stage(model, ttq)
    install_stage(model, StagePlan("int", early.layers, spec=QuantSpec("int", bits=bits)))
    return export_ternary(model).eval()


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_file_stores_grid_codes_exactly(bits, tmp_path):
    model = int_model(bits)
    rows = conv_rows(model)
    ints = [r for r in rows if r["kind"] == "int"]
    # the listing gives the width the codes need (at most the configured one: 4-bit LSQ at its first step uses 3)
    used = {r["bits"] for r in ints}
    assert ints and used <= set(range(2, bits + 1)) and all(r["layer"] in (2, 3, 4, 5, 6) for r in ints)
    tot = totals(model, rows)
    assert tot["int_params"] == sum(r["params"] for r in ints)
    assert tot["int_weight_bits"] == sum(r["params"] * r["bits"] for r in ints)
    tensors, _ = pack_state(model)
    kinds = entry_kinds(tensors)
    assert sum(k == f"grid{bits}" for k in kinds.values()) == len(ints)  # stored at 2 or 4 bits
    n = sum(r["params"] for r in ints)
    code_bytes = sum(t.numel() for k, t in tensors.items() if k.endswith(f".grid{bits}"))
    assert code_bytes <= n * bits / 8 + len(ints)  # bits per weight, at most one padding byte per tensor
    check = write_verified(model, tmp_path / "m.tq.safetensors")
    assert check["ok"] and check["grid"] == len(ints) and check["grid_max_rel_err"] <= 1e-6  # float32 grid: exact
    half = write_verified(model.half().float(), tmp_path / "h.tq.safetensors")  # as Ultralytics stores weights
    assert half["ok"] and half["grid"] == len(ints) and half["grid_max_rel_err"] <= 2.0**-10


def test_bit_counting_by_hand():
    # 100 parameters: 40 ternary at 2 bits, 30 at 4 bits, 30 at 32
    assert model_bits(100, 40, 2, 32, int_params=30, int_weight_bits=120) == 80 + 120 + 30 * 32
    with pytest.raises(ValueError, match="must fit"):
        model_bits(100, 80, 2, 32, int_params=30, int_weight_bits=120)


def test_deployable_onnx_decodes_grid_weights(tmp_path):
    """The fused ONNX export of an INT4 model: its grid weights become 4-bit codes and decode within float rounding
    in onnxruntime, and the encoded graph computes what the FP export does."""
    from yolo_tq.io import save_stock_checkpoint

    ckpt = save_stock_checkpoint(int_model(4), tmp_path / "int4.pt")
    from ultralytics import YOLO

    path = YOLO(str(ckpt)).export(format="onnx", imgsz=64, simplify=True, project=str(tmp_path))
    fp = onnx.load(str(path))
    enc, done = dx.encode_model(fp, "fp32")
    kinds = [e.kind for e in done]
    assert "grid" in kinds and "ternary" in kinds
    assert all(e.bits == 4 for e in done if e.kind == "grid")
    errors = dx.verify_encoding(fp, enc, done)
    assert errors["max_rel_error_grid"] <= dx.GRID_MAX_REL_ERROR
    import onnxruntime as ort

    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
                for m in (fp, enc))
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    grid = sum(e.bytes_after for e in done if e.kind == "grid")
    assert grid < 0.2 * sum(e.bytes_before for e in done if e.kind == "grid")  # 4 of 32 bits, plus steps


def test_layers_command_lists_kind_and_bits(tmp_path):
    from yolo_tq.io import save_stock_checkpoint

    ckpt = save_stock_checkpoint(int_model(2), tmp_path / "int2.pt")
    r = run_here("test.py", ckpt, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "int2" in r.stdout and "ternary" in r.stdout and "integer-grid convs:" in r.stdout
