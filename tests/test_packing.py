"""Packed ternary format: code packing, INT8 per channel, BN affine, file round trip, size budget, bad input,
and the size / pack commands."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO, build_model, c2psa_plan, progressive_stage_plans
from yolo_tq.formats import codes as codec
from yolo_tq.formats import layout, metadata, reader, verify
from yolo_tq.formats import packed as packing
from yolo_tq.quant.apply import export_ternary, install_stage, quantized_modules
from yolo_tq.quant.layers import PackedBitLinear

STAGE_PLANS = progressive_stage_plans()


def ternary_model(nc: int = 80, plans=STAGE_PLANS, export: bool = True):
    torch.manual_seed(0)
    model = build_model("yolo11n.yaml", nc)
    model.names = {i: f"c{i}" for i in range(nc)}
    for plan in plans:
        install_stage(model, plan)
    return (export_ternary(model) if export else model).eval()


def header_of(path) -> tuple[int, dict]:
    """(header length, header JSON) of a safetensors file: the first 8 bytes give the header's length."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


@pytest.fixture(scope="module")
def model80():
    return ternary_model()


@pytest.fixture(scope="module")
def packed80(model80, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "m.safetensors"
    return packing.write_packed(model80, path, "int8")


# ----------------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("n", [1, 2, 4, 6, 7, 13, 1001, 4099])
def test_trits_round_trip_awkward_sizes(n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 3, (n,), generator=g, dtype=torch.uint8)
    packed = codec.pack_trits(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 5)
    assert int(packed.max()) <= 242
    assert torch.equal(codec.unpack_trits(packed, n), codes)


def test_trits_known_value_and_bad_input():
    assert codec.pack_trits(torch.tensor([1, 2, 0, 0, 1], dtype=torch.uint8)).tolist() == [1 + 2 * 3 + 81]
    assert codec.pack_trits(torch.tensor([2, 2, 2, 2, 2, 1], dtype=torch.uint8)).tolist() == [242, 1]
    with pytest.raises(ValueError):
        codec.pack_trits(torch.tensor([3], dtype=torch.uint8))
    with pytest.raises(codec.PackError, match="base-3"):
        codec.unpack_trits(torch.tensor([243], dtype=torch.uint8), 5)
    with pytest.raises(codec.PackError, match="cannot hold"):
        codec.unpack_trits(torch.tensor([0, 0], dtype=torch.uint8), 5)


@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (5, 1, 1, 1), (1, 13), (3, 2, 5, 5)])
def test_ternary_tensor_exact(shape):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 3, shape, generator=g)
    w = torch.where(codes == 1, torch.tensor(0.0371), torch.where(codes == 2, torch.tensor(-0.0219), torch.tensor(0.0)))
    c, wp, wn = codec.ternary_codes(w)
    assert (wp, wn) == (float(torch.tensor(0.0371)), float(torch.tensor(0.0219)))
    back = codec.decode_ternary(codec.unpack_trits(codec.pack_trits(c), w.numel()), wp, wn, shape)
    assert torch.equal(back, w)


def test_ternary_codes_partial_sets_and_rejects_non_ternary():
    for w in (torch.tensor([0.5, 0.0, 0.5]), torch.tensor([-0.25, -0.25, 0.0]), torch.tensor([0.5, -0.25]),
              torch.zeros(4)):
        c, wp, wn = codec.ternary_codes(w)
        assert torch.equal(codec.decode_ternary(c, wp, wn, w.shape), w)
    with pytest.raises(ValueError, match="not ternary"):
        codec.ternary_codes(torch.tensor([0.5, 0.25, 0.0]))


def test_int8_per_channel_within_half_a_step():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-2, 1, 16).reshape(16, 1, 1, 1)
    w[3] = 0.0  # a dead channel
    for dtype in (torch.float16, torch.float32):
        q, s = codec.quantize_int8_per_channel(w, dtype)
        assert q.dtype == torch.int8 and s.dtype == dtype and s.shape == (16,)
        assert int(q.abs().max()) <= 127
        step = s.float().reshape(16, 1, 1, 1)
        err = (codec.dequantize_int8(q, s) - w).abs()
        assert torch.all(err <= 0.5 * step + 1e-12)
        assert float(s[3]) == 0.0 and torch.all(q[3] == 0)
        # symmetric per channel: the largest magnitude of each live channel maps to +-127
        live = [i for i in range(16) if i != 3]
        assert torch.all(q[live].reshape(15, -1).abs().amax(1) >= 126)


def test_int8_scale_that_does_not_fit_fp16_is_refused():
    with pytest.raises(ValueError):
        codec.quantize_int8_per_channel(torch.full((2, 3), 1e7), torch.float16)
    with pytest.raises(ValueError):  # subnormal FP16 step would be far coarser than max|w|/127
        codec.quantize_int8_per_channel(torch.full((2, 3), 1e-4), torch.float16)
    q, s = codec.quantize_int8_per_channel(torch.full((2, 3), 1e-4), torch.float32)
    assert torch.allclose(codec.dequantize_int8(q, s), torch.full((2, 3), 1e-4))


def test_bn_affine_round_trip_computes_same_function():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(6, eps=1e-3).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3)
    scale, shift = codec.bn_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    bn2 = nn.BatchNorm2d(6, eps=1e-3).eval()
    bn2.load_state_dict(codec.bn_from_affine(scale, shift, bn2.eps), strict=False)
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(bn2(x), bn(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- whole models
def payload_formula(model: nn.Module, rest: str) -> int:
    """Bytes of the tensors alone, by the format's definition (no header, no metadata)."""
    from yolo_tq.quant.ternary import ternary_values

    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            total += 2 * 2 * m.num_features
        elif isinstance(m, nn.Conv2d):
            n = m.weight.numel()
            if "dfl" in name:
                total += 2 * n
            elif ternary_values(m.weight) is not None:
                total += math.ceil(n / 5) + 8
            else:
                total += n + 2 * m.out_channels if rest == "int8" else 2 * n
            total += 2 * m.bias.numel() if m.bias is not None else 0
    return total


@pytest.mark.parametrize("rest", ["int8", "fp16"])
def test_file_size_matches_bit_budget(model80, tmp_path, rest):
    path = packing.write_packed(model80, tmp_path / f"{rest}.safetensors", rest)
    header_len, header = header_of(path)
    assert os.path.getsize(path) - 8 - header_len == payload_formula(model80, rest)
    assert header_len <= 40_000  # one header entry per stored tensor (343 for yolo11n) and the JSON metadata
    tensors, _ = reader.read_packed(path)
    ternary = [k for k, kind in layout.entry_kinds(tensors).items() if kind == "ternary"]
    n_tern = sum(model80.state_dict()[k].numel() for k in ternary)
    assert n_tern == 1_368_320 and len(ternary) == 34
    code_bytes = sum(tensors[f"{k}.codes"].numel() for k in ternary)
    assert code_bytes * 8 / n_tern <= 1.6 + 1e-3  # 5 codes per byte
    assert all(header[f"{k}.codes"]["dtype"] == "U8" and header[f"{k}.scales"]["shape"] == [2] for k in ternary)


def test_round_trip_ternary_identical_int8_within_step(model80, packed80):
    tensors, meta = reader.read_packed(packed80)
    model = reader.model_from_packed(tensors, meta)
    assert type(model).__name__ == "DetectionModel" and not model.training
    check = verify.verify_round_trip(model80, model, tensors)
    assert check["ternary"] == 34 and check["ternary_identical"] == 34
    assert check["int8"] > 0 and check["int8_max_err_steps"] <= 0.5 + 1e-3 and check["ok"]
    assert check["bn"] == sum(isinstance(m, nn.BatchNorm2d) for m in model80.modules())
    src, out = model80.state_dict(), model.state_dict()
    for name, prec in layout.entry_kinds(tensors).items():
        if prec == "ternary":
            assert torch.equal(src[name], out[name]), name
        elif prec == "int8":
            step = src[name].reshape(src[name].shape[0], -1).abs().amax(1) / 127
            err = (src[name] - out[name]).reshape(step.numel(), -1).abs().amax(1)
            assert torch.all(err <= step * (0.5 + 1e-3) + 1e-12), name
    assert torch.equal(src["model.23.dfl.conv.weight"], out["model.23.dfl.conv.weight"])
    assert model.names == model80.names and model.stride.tolist() == [8.0, 16.0, 32.0]
    assert meta["ternary_layers"] == [2, 3, 4, 5, 6, 7, 8, 13, 16, 17, 19, 20, 22]


def test_fp16_rest_close_to_source(model80, tmp_path):
    path = packing.write_packed(model80, tmp_path / "fp16.safetensors", "fp16")
    model = reader.load_packed(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model80(x)[0], model(x)[0]
    assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())


def test_tensor_with_a_tiny_channel_keeps_fp32_scales(model80, tmp_path):
    import copy

    model = copy.deepcopy(model80)
    conv = model.get_submodule("model.1.conv")
    with torch.no_grad():
        conv.weight[5] = conv.weight[5].sign() * 1e-4  # its INT8 step would be subnormal in FP16
    path = packing.write_packed(model, tmp_path / "tiny.safetensors")
    tensors, meta = reader.read_packed(path)
    tags = layout.entry_kinds(tensors)
    assert tags["model.1.conv.weight"] == tags["model.0.conv.weight"] == "int8"
    assert tensors["model.1.conv.weight.scale"].dtype == torch.float32
    assert tensors["model.1.conv.weight.scale"].shape == (conv.out_channels,)
    assert tensors["model.0.conv.weight.scale"].dtype == torch.float16
    check = verify.verify_round_trip(model, reader.model_from_packed(tensors, meta), tensors)
    assert check["ok"] and check["int8_max_err_steps"] <= 0.5 + 1e-3
    assert os.path.getsize(path) - os.path.getsize(packing.write_packed(model80, tmp_path / "m.safetensors")) < 200


def test_training_model_is_packed_through_its_stock_export(tmp_path):
    from yolo_tq.eval.size import stock_ternary_model

    train_model = ternary_model(nc=2, plans=STAGE_PLANS[:1], export=False)
    with pytest.raises(codec.PackError, match="quantized training modules"):
        packing.pack_state(train_model)
    stock = stock_ternary_model(train_model)
    model = reader.load_packed(packing.write_packed(stock, tmp_path / "t.safetensors"))
    for path, q in quantized_modules(train_model).items():
        assert torch.equal(model.get_submodule(path).weight, q.weight.detach()), path


def test_loads_without_unpickling(packed80, monkeypatch):
    import pickle

    _, header = header_of(packed80)
    assert set(header) >= {"__metadata__", "model.2.m.0.cv1.conv.weight.codes", "model.2.m.0.cv1.conv.weight.scales",
                           "model.0.conv.weight.int8", "model.0.conv.weight.scale", "model.0.bn.bn_scale",
                           "model.0.bn.bn_shift", "model.23.dfl.conv.weight"}
    assert header["model.0.conv.weight.int8"] == {**header["model.0.conv.weight.int8"], "dtype": "I8",
                                                  "shape": [16, 3, 3, 3]}
    assert json.loads(header["__metadata__"][metadata.META_KEY])["format_version"] == metadata.FORMAT_VERSION == 2

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model = reader.load_packed(packed80)
    assert sum(p.numel() for p in model.parameters()) == 2_624_080


# ------------------------------------------------------------------------------------------------------- errors
def test_refuses_non_ternary_and_bad_options():
    fp = build_model("yolo11n.yaml", 2)
    with pytest.raises(codec.PackError, match="no ternary or integer-grid weights"):
        packing.pack_state(fp)
    with pytest.raises(codec.PackError, match="unknown precision"):
        packing.pack_state(fp, rest="int4")
    with pytest.raises(codec.PackError, match="cannot pack a Conv2d"):
        packing.pack_state(nn.Conv2d(3, 3, 3))
    tensors, meta = packing.pack_state(fp, require_ternary=False)  # INT8 / FP16 only
    assert meta["ternary_layers"] == [] and set(layout.entry_kinds(tensors).values()) == {"int8", "fp16", "bn"}


def test_refuses_a_state_key_with_a_reserved_suffix(model80):
    import copy

    model = copy.deepcopy(model80)
    model.model[1].register_buffer("codes", torch.zeros(3))
    with pytest.raises(codec.PackError, match="reserves"):
        packing.pack_state(model)


def test_corrupt_truncated_and_foreign_files(packed80, tmp_path):
    from safetensors.torch import save_file

    raw = packed80.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(codec.PackError, match="corrupt or truncated"):
        reader.load_packed(bad)
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(codec.PackError, match="corrupt or truncated"):
        reader.load_packed(bad)
    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(codec.PackError, match="not a packed YOLO-TQ model"):
        reader.load_packed(bad)
    with pytest.raises(FileNotFoundError):
        reader.load_packed(tmp_path / "missing.safetensors")


def _rewrite(tensors, meta, path):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", metadata.META_KEY: json.dumps(meta)})
    return path


CODES, INT8 = "model.2.m.0.cv1.conv.weight.codes", "model.0.conv.weight.int8"
RECORD = {"kind": "bitlinear", "source_class": "BitLinear_TTQ", "act_bits": 8, "per_token": True,
          "restore_token_stats": True, "norm_eps": 1e-5}
CORRUPTIONS = {  # name -> (change to the tensors and metadata, message)
    "missing entry": (lambda t, m: t.pop("model.0.bn.bn_shift"), "'model.0.bn.bn_shift' is missing"),
    "int8 as float": (lambda t, m: t.update({INT8: t[INT8].float()}), "is torch.float32, the format stores it as "
                                                                      "torch.int8"),
    "codes as int16": (lambda t, m: t.update({CODES: t[CODES].to(torch.int16)}), "stores it as torch.uint8"),
    "bn as float32": (lambda t, m: t.update({"model.0.bn.bn_scale": t["model.0.bn.bn_scale"].float()}),
                      "stores it as torch.float16"),
    "fp16 as int": (lambda t, m: t.update({"model.23.dfl.conv.weight": t["model.23.dfl.conv.weight"].long()}),
                    "stores it as torch.float16"),
    "int8 shape": (lambda t, m: t.update({INT8: t[INT8][:, :2].contiguous()}), r"has shape \[16, 2, 3, 3\], the "
                                                                               r"model built from the yaml needs"),
    "one code byte short": (lambda t, m: t.update({CODES: t[CODES][:-1].contiguous()}), "has shape"),
    "scales shape": (lambda t, m: t.update({"model.0.conv.weight.scale": torch.ones(3, dtype=torch.float16)}),
                     r"needs \[16\]"),
    "extra tensor": (lambda t, m: t.update({"extra": torch.zeros(1)}), r"no place for: \['extra'\]"),
    "not base 3": (lambda t, m: t.update({CODES: torch.full_like(t[CODES], 250)}), "base-3"),
    "negative scale": (lambda t, m: t.update({CODES[:-6] + ".scales": torch.tensor([-1.0, 0.5])}),
                       "finite and >= 0"),
    "version": (lambda t, m: m.update({"format_version": 1}), "format version 1 is not supported"),
    "bad record": (lambda t, m: m.update({"modules": {"model.0.conv": {**RECORD, "act_bits": 99}}}),
                   "bad settings"),
    "record path": (lambda t, m: m.update({"modules": {"model.99.conv": RECORD}}), "'model.99.conv', which"),
}


@pytest.fixture(scope="module")
def rebuilt80(packed80):
    """The model packed80's metadata describes, built once (load_packed's first step)."""
    return reader.build_model(reader.read_packed(packed80)[1])


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_entry_is_a_one_line_pack_error(packed80, rebuilt80, tmp_path, case):
    """Each step of load_packed after building the model: read, install BitLinear records, decode."""
    tensors, meta = reader.read_packed(packed80)
    change, pattern = CORRUPTIONS[case]
    change(tensors, meta)
    path = _rewrite(tensors, meta, tmp_path / "bad.safetensors")
    with pytest.raises(codec.PackError, match=pattern) as e:
        tensors, meta = reader.read_packed(path)
        reader.install_packed_modules(rebuilt80, meta["modules"])
        reader.decode_state(tensors, rebuilt80)
    assert "\n" not in str(e.value)


def test_corrupt_file_fails_in_load_packed(packed80, tmp_path):
    tensors, meta = reader.read_packed(packed80)
    bad = json.loads(json.dumps(meta))
    bad.update({"nc": 3, "yaml": {**meta["yaml"], "nc": 3}, "names": {"0": "a", "1": "b", "2": "c"}})
    with pytest.raises(codec.PackError, match=r"model.23.cv3.* has shape \[80\], the model built from the yaml"):
        reader.load_packed(_rewrite(tensors, bad, tmp_path / "nc.safetensors"))
    tensors[INT8] = tensors[INT8].float()
    with pytest.raises(codec.PackError, match="int8.*stores it as torch.int8") as e:
        reader.load_packed(_rewrite(tensors, meta, tmp_path / "dtype.safetensors"))
    assert str(e.value).startswith(str(tmp_path / "dtype.safetensors")) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------- CLI
class CliResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run compression_calculation.py in this process (as `python compression_calculation.py ARGS`)."""
    import runpy

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["compression_calculation.py", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / "compression_calculation.py"), run_name="__main__")
        out, err = capsys.readouterr()
        return CliResult(exc.value.code, out, err)

    return run


@pytest.fixture
def yolo_tq(capsys):
    """Run the `yolo-tq` console script in this process."""
    from yolo_tq.cli import main

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(list(map(str, args)))
        out, err = capsys.readouterr()
        return CliResult(exc.value.code, out, err)

    return run


@pytest.fixture(scope="module")
def tiny_ternary_checkpoint(tiny_fp_checkpoint, tmp_path_factory):
    from yolo_tq.io import load_model, save_stock_checkpoint

    model, _ = load_model(tiny_fp_checkpoint)
    for plan in STAGE_PLANS:
        install_stage(model, plan)
    d = tmp_path_factory.mktemp("tern")
    return {"train": save_stock_checkpoint(model, d / "train.pt"),
            "stock": save_stock_checkpoint(export_ternary(model), d / "ternary.pt")}


def assert_unpacked_holds(pt, packed):
    """The unpacked .pt holds the packed file's model: same ternary weights (saved in FP16, as Ultralytics saves)."""
    from yolo_tq.io import load_model

    model, ckpt = load_model(pt)
    tensors, meta = reader.read_packed(packed)
    ref = reader.model_from_packed(tensors, meta).state_dict()
    ternary = [k for k, kind in layout.entry_kinds(tensors).items() if kind == "ternary"]
    assert len(ternary) == 34 and ckpt["packed_source"] == str(packed)
    for k in ternary:
        assert torch.equal(model.state_dict()[k], ref[k].half().float()), k


def test_cli_pack_unpack_validate(cli, tiny_fp_checkpoint, tiny_ternary_checkpoint, tiny_data, tmp_path,
                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ultralytics writes its validation folder under the working directory
    out, js, pt = tmp_path / "m.safetensors", tmp_path / "r.json", tmp_path / "u.pt"
    r = cli("--baseline", tiny_fp_checkpoint, "--quantized", tiny_ternary_checkpoint["train"], "--pack", out,
            "--json", js)
    assert r.returncode == 0, r.stderr
    assert "34/34 ternary tensors identical" in r.stdout
    rep = json.loads(js.read_text())
    assert rep["quantized"]["counts"]["ternary_params"] == 1_368_320
    assert f"{rep['theoretical'][0]['ratio']:.2f}x" in r.stdout
    assert rep["packed"]["bytes"] == os.path.getsize(out) == rep["files"]["packed_ternary_int8_rest"]
    assert rep["packed"]["round_trip"]["ok"] and rep["packed"]["rest"] == "int8"
    assert rep["files"]["packed_ternary_int8_rest"] < rep["files"]["packed_ternary_fp16_rest"] \
        < rep["files"]["stock_ternary_export_pt"]
    r = cli("--unpack", out, "--unpacked-pt", pt, "--val-data", tiny_data, "--imgsz", 64, "--device", "cpu",
            "--json", js)
    assert r.returncode == 0, r.stderr
    assert_unpacked_holds(pt, out)
    rep = json.loads(js.read_text())
    assert rep["packed"]["ternary_tensors"] == 34 and rep["packed"]["bytes"] == os.path.getsize(out)
    m = rep["validation"]["unpacked"]["mAP50-95"]
    assert 0.0 <= m <= 1.0 and f"mAP50-95 {m:.4f}" in r.stdout


def test_pack_command_packs_and_unpacks(yolo_tq, tiny_ternary_checkpoint, tmp_path):
    out, out16, pt = tmp_path / "p.safetensors", tmp_path / "p16.safetensors", tmp_path / "p.pt"
    r = yolo_tq("pack", tiny_ternary_checkpoint["train"], out)
    assert r.returncode == 0, r.stderr
    assert "34/34 ternary tensors identical" in r.stdout
    _, meta = reader.read_packed(out)
    assert meta["rest_precision"] == "int8" and meta["source"] == "train.pt"
    assert yolo_tq("pack", tiny_ternary_checkpoint["stock"], out16, "--fp16-rest").returncode == 0
    assert reader.read_packed(out16)[1]["rest_precision"] == "fp16" and out16.stat().st_size > out.stat().st_size
    r = yolo_tq("pack", "--unpack", out, "--out", pt)
    assert r.returncode == 0, r.stderr
    assert_unpacked_holds(pt, out)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for args, words in ((("pack", out), "CKPT OUT"), (("pack", "--unpack", out), "needs --out"),
                        (("pack", "--unpack", out, "--out", pt, "--fp16-rest"), "takes no"),
                        (("pack", tiny_ternary_checkpoint["train"], blocker / "p.safetensors"),
                         "cannot write the packed file"),
                        (("pack", tmp_path, out), "is a folder, not a file")):
        r = yolo_tq(*args)
        assert r.returncode == 2 and words in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


def test_cli_errors(cli, tiny_fp_checkpoint, packed80, tmp_path):
    r = cli("--baseline", tiny_fp_checkpoint, "--quantized", tiny_fp_checkpoint)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "no ternary" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    r = cli("--unpack", bad)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr
    tensors, meta = reader.read_packed(packed80)
    tensors[INT8] = tensors[INT8].float()
    r = cli("--unpack", _rewrite(tensors, meta, bad))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "stores it as torch.int8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # no traceback
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    r = cli("--baseline", tiny_fp_checkpoint, "--quantized", foreign)
    assert r.returncode == 2 and r.stderr.startswith("error:")
    r = cli("--quantized", foreign)
    assert r.returncode == 2 and "--baseline" in r.stderr


# ------------------------------------------------------------------------------ crafted files: data, never code
SAFETENSORS_DTYPE = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.float32: "F32",
                     torch.int64: "I64"}


def write_raw(path, tensors, meta, huge: dict | None = None, meta_text: str | None = None):
    """A safetensors file written byte by byte (what an attacker writes): `huge` maps names to (dtype, shape)
    whose data is a sparse run of zeros (no disk, no memory); `meta_text` replaces the metadata JSON."""
    entries, offset = {}, 0
    items = [(k, SAFETENSORS_DTYPE[t.dtype], list(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    items += [(k, dtype, list(shape), math.prod(shape)) for k, (dtype, shape) in (huge or {}).items()]
    for name, dtype, shape, nbytes in items:
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = meta_text if meta_text is not None else json.dumps(meta)
    header = json.dumps({"__metadata__": {"format": "pt", metadata.META_KEY: text}, **entries}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
        f.truncate(f.tell() + offset - sum(t.numel() * t.element_size() for t in tensors.values()))
    return path


class Unpickled:
    """Touches `marker` when unpickled: the payload of a pickle that a loader must never open."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def with_yaml(**changes):
    """A metadata change: the architecture yaml with `changes` (a callable value gets the yaml)."""
    def change(t, m, tmp):
        for k, v in changes.items():
            m["yaml"][k] = v(m["yaml"], tmp) if callable(v) else v
    return change


def code_activation(yaml, tmp):
    return f"__import__('os').system('touch {tmp / 'pwned_activation'}')"


def loader_layer(yaml, tmp):
    """backbone[0] becomes Ultralytics' checkpoint loader with the path of a booby-trapped pickle (quoted, as
    parse_model literal_evals string arguments)."""
    torch.save({"model": Unpickled(tmp / "pwned_pickle")}, tmp / "trap.pt")
    return [[-1, 1, "torch_safe_load", [repr(str(tmp / "trap.pt"))]], *yaml["backbone"][1:]]


NOT_C2PSA = "model.2.cv1.conv"  # a real conv of yolo11n, outside C2PSA
CRAFTED = {  # name -> (change to (tensors, metadata, tmp folder), message)
    "activation with code": (with_yaml(activation=code_activation), r"'activation' is \"__import__\('os'\)"),
    "layer named torch_safe_load": (with_yaml(backbone=loader_layer), r"'backbone'\[0\]\[2\] is 'torch_safe_load'"),
    "nc = 10^7": (lambda t, m, tmp: m.update(nc=10**7, yaml={**m["yaml"], "nc": 10**7}), "nc is 10000000"),
    "nc = 0": (lambda t, m, tmp: m.update(nc=0, yaml={**m["yaml"], "nc": 0}), r"integer in 1\.\.10000"),
    "nc as float": (lambda t, m, tmp: m.update(nc=80.0), r"nc is 80\.0"),
    "names fewer than nc": (lambda t, m, tmp: m["names"].pop("79"), r"'names' must map '0'\.\.'79'"),
    "unknown scale": (with_yaml(scale="q"), "scale 'q' is not a YOLO11 scale"),
    "scale as a list": (with_yaml(scale=["n"]), r"scale \['n'\] is not a YOLO11 scale"),
    "wider scale": (with_yaml(scales=lambda y, tmp: {**y["scales"], "n": [0.5, 0.25, 10**6]}),
                    r"'scales' is .*Ultralytics' has"),
    "extra yaml key": (with_yaml(depth_multiple=100.0), r"'depth_multiple' is 100\.0, Ultralytics' has absent"),
    "bool for int in a layer": (with_yaml(backbone=lambda y, tmp: [[-1, True, *y["backbone"][0][2:]],
                                                                   *y["backbone"][1:]]),
                                r"'backbone'\[0\]\[1\] is True, Ultralytics' has 1"),
    "4 input channels": (with_yaml(channels=4), "YOLO11 takes 3 input channels"),
    "other model class": (lambda t, m, tmp: m.update(model_class="SegmentationModel"), "is not supported"),
    "unknown metadata field": (lambda t, m, tmp: m.update(hook="x"), r"unknown fields \['hook'\]"),
    "stride of the wrong model": (lambda t, m, tmp: m.update(stride=[4.0, 8.0, 16.0]), "does not match"),
    "stride 10^200": (lambda t, m, tmp: m.update(stride=[10**200]), "not a short list of positive numbers"),
    "stride 10^400": (lambda t, m, tmp: m.update(stride=[10**400, float("nan")]), "not a short list of positive"),
    "norm_eps NaN": (lambda t, m, tmp: m.update(modules={"model.10.m.0.attn.qkv.conv": {
        **RECORD, "norm_eps": float("nan")}}), "norm_eps is nan"),
    "BitLinear outside C2PSA": (lambda t, m, tmp: m.update(modules={NOT_C2PSA: RECORD}),
                                f"'{NOT_C2PSA}', which is not a C2PSA conv"),
    "BitLinear act_bits true": (lambda t, m, tmp: m.update(modules={"model.10.m.0.attn.qkv.conv": {
        **RECORD, "act_bits": True}}), "act_bits is True"),
    "BitLinear per_token string": (lambda t, m, tmp: m.update(modules={"model.10.m.0.attn.qkv.conv": {
        **RECORD, "per_token": "no"}}), "per_token is 'no'"),
    "BitLinear extra field": (lambda t, m, tmp: m.update(modules={"model.10.m.0.attn.qkv.conv": {
        **RECORD, "cls": "os.system"}}), "bad settings"),
    "NaN weight": (lambda t, m, tmp: t.update({"model.23.dfl.conv.weight": torch.full_like(
        t["model.23.dfl.conv.weight"], float("nan"))}), "NaN or Inf"),
}


def crafted_file(packed80, tmp_path, case):
    tensors, meta = reader.read_packed(packed80)
    CRAFTED[case][0](tensors, meta, tmp_path)
    return write_raw(tmp_path / f"{case.replace(' ', '_')}.tq.safetensors", tensors, meta)


def assert_nothing_ran(tmp_path):
    assert not list(tmp_path.glob("pwned*")), "code from the file ran"


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_file_is_one_pack_error_and_runs_nothing(packed80, tmp_path, case):
    path = crafted_file(packed80, tmp_path, case)
    for load in (reader.read_packed, reader.load_packed):
        with pytest.raises(codec.PackError, match=CRAFTED[case][1]) as e:
            load(path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    tensors, meta = reader.read_packed(packed80)
    CRAFTED[case][0](tensors, meta, tmp_path)
    with pytest.raises(codec.PackError, match=CRAFTED[case][1]):  # the in-memory path checks the same
        reader.model_from_packed(tensors, meta)
    assert_nothing_ran(tmp_path)
    assert (tmp_path / "trap.pt").exists() == (case == "layer named torch_safe_load")


TRAPS = """
import sys
from pathlib import Path
from ultralytics.nn.tasks import parse_model
from yolo_tq.formats.metadata import reference_yaml
from test_packing import code_activation, loader_layer
tmp, found = Path(sys.argv[1]), []
for key, payload in (("backbone", loader_layer), ("activation", code_activation)):
    yaml = reference_yaml("n")
    yaml[key] = payload(yaml, tmp)
    try:
        parse_model(yaml, ch=3, verbose=False)
    except Exception:
        pass  # the code has run by then
    found.append(sorted(p.name for p in tmp.glob("pwned*")))
print(found)
"""


def test_the_traps_are_real(tmp_path):
    """The two payloads do run when handed to Ultralytics' own yaml parser and checkpoint loader (in another
    process: the activation is process-wide state), so the loader is safe because it never hands them over."""
    r = subprocess.run([sys.executable, "-c", TRAPS, str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO / "tests", env={**os.environ, "YOLO_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[['pwned_pickle'], ['pwned_activation', 'pwned_pickle']]"


def test_header_shapes_beyond_any_buffer_are_one_line(packed80, tmp_path):
    tensors, meta = reader.read_packed(packed80)
    path = write_raw(tmp_path / "x.tq.safetensors", tensors, meta)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for shape in ([10**200], [2**40, 2**40]):
        header[CODES]["shape"] = shape
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        with pytest.raises(codec.PackError, match="not a readable packed file") as e:
            reader.load_packed(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ['{"format": "yolo-tq-packed", "nc": ' + "9" * 5000 + "}", "[" * 100_000,
                                  '{"format": "yolo-tq-packed"', "null"],
                         ids=["5000-digit int", "deep nesting", "cut short", "null"])
def test_metadata_json_that_python_refuses_is_one_line(packed80, tmp_path, text):
    tensors, meta = reader.read_packed(packed80)
    path = write_raw(tmp_path / "j.tq.safetensors", tensors, meta, meta_text=text)
    with pytest.raises(codec.PackError, match="not valid JSON|does not describe") as e:
        reader.load_packed(path)
    assert "\n" not in str(e.value)


FAST_FAIL = """
import json, resource, sys, time
from yolo_tq.formats import codes as codec, metadata, reader
metadata.reference_yaml("n")  # imports Ultralytics
from ultralytics.nn.tasks import DetectionModel
DetectionModel(metadata.reference_yaml("n"), verbose=False)  # warm
out = {}
for path in sys.argv[1:]:
    rss, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        reader.load_packed(path)
        msg = "loaded"
    except codec.PackError as e:
        msg = str(e)
    out[path] = [time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024, msg]
print(json.dumps(out))
"""


def test_huge_nc_and_huge_tensor_fail_fast_without_allocating(packed80, tmp_path):
    """nc = 10^7 (4.5 GB before this check) and a 1 GiB code tensor the header declares (a sparse file:
    safetensors accepts it, reading it would allocate 1 GiB) are refused in well under 2 s, RSS growing little."""
    nc_file = crafted_file(packed80, tmp_path, "nc = 10^7")
    tensors, meta = reader.read_packed(packed80)
    tensors.pop(CODES)
    big = write_raw(tmp_path / "big.tq.safetensors", tensors, meta, huge={CODES: ("U8", [2**30])})
    assert big.stat().st_size > 2**30 and big.stat().st_blocks * 512 < 2**24  # sparse on disk
    r = subprocess.run([sys.executable, "-c", FAST_FAIL, str(nc_file), str(big)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "YOLO_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    (t_nc, rss_nc, msg_nc), (t_big, rss_big, msg_big) = res[str(nc_file)], res[str(big)]
    assert "nc is 10000000" in msg_nc and t_nc < 2.0 and rss_nc < 100, res
    assert f"'{CODES}' has shape [1073741824], the model built from the yaml needs" in msg_big, res
    assert t_big < 2.0 and rss_big < 300, res


CLI_CASES = ["activation with code", "layer named torch_safe_load", "nc = 10^7", "unknown scale",
             "BitLinear outside C2PSA"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_crafted_file_through_the_clis(cli, yolo_tq, packed80, tmp_path, case):
    path, out = crafted_file(packed80, tmp_path, case), tmp_path / "out.pt"
    for r in (cli("--unpack", path, "--unpacked-pt", out), yolo_tq("pack", "--unpack", path, "--out", out)):
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], r.stderr
        assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()
    assert_nothing_ran(tmp_path)


def test_packer_refuses_what_the_loader_refuses(model80):
    import copy

    model = copy.deepcopy(model80)
    model.yaml = {**model.yaml, "activation": "nn.ReLU()"}
    with pytest.raises(codec.PackError, match="only builds Ultralytics YOLO11.*'activation'"):
        packing.pack_state(model)
    model.yaml = {k: v for k, v in model80.yaml.items()}
    model.names = {0: "only one"}
    with pytest.raises(codec.PackError, match="'names' must map"):
        packing.pack_bytes(model)


# -------------------------------------------------------------------------------------------- on ../shared data
def test_shared_stage_1_3_packs_under_target(shared_weights, tmp_path):
    from yolo_tq.io import load_model

    model, _ = load_model(shared_weights)
    for plan in STAGE_PLANS:
        install_stage(model, plan)
    stock = export_ternary(model)
    path = packing.write_packed(stock, tmp_path / "s3.safetensors")
    assert os.path.getsize(path) <= 1_600_000
    tensors, meta = reader.read_packed(path)
    assert verify.verify_round_trip(stock, reader.model_from_packed(tensors, meta), tensors)["ok"]


def test_loader_needs_no_training_code(packed80):
    code = ("import sys; from yolo_tq.formats.reader import load_packed; m = load_packed(sys.argv[1]); "
            "bad = [k for k in sys.modules if k.startswith(('yolo_tq.train', 'yolo_tq.config', "
            "'ultralytics.engine.trainer'))]; print(type(m).__name__, bad, 'yolo_tq.quant.apply' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(packed80)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "YOLO_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "DetectionModel [] True"  # modules go in through quantize_


@pytest.mark.parametrize("mode", ["bitlinear_ttq", "bitlinear_standard"])
def test_bitlinear_layers_round_trip(tmp_path, mode):
    from yolo_tq.eval.size import stock_ternary_model
    from yolo_tq.io import load_model, save_stock_checkpoint

    train_model = ternary_model(nc=2, plans=STAGE_PLANS[:1], export=False)
    paths = install_stage(train_model, c2psa_plan(mode))
    stock = stock_ternary_model(train_model).eval()
    path = packing.write_packed(stock, tmp_path / "bl.safetensors", "fp16")
    tensors, meta = reader.read_packed(path)
    assert sorted(meta["modules"]) == sorted(paths) and len(paths) == 5
    assert {r["source_class"] for r in meta["modules"].values()} == {type(train_model.get_submodule(paths[0])).__name__}
    model = reader.model_from_packed(tensors, meta)
    check = verify.verify_round_trip(stock, model, tensors)
    assert check["ternary"] == check["ternary_identical"] == 15 + 5 and check["ok"]
    for p in paths:
        q = model.get_submodule(p)
        assert type(q) is PackedBitLinear and torch.equal(q.weight, stock.get_submodule(p).weight.detach())
        assert f"{p}.latent_weight" in model.state_dict() and f"{p}.quantizer.wp" not in model.state_dict()
        src_spec = stock.get_submodule(p).spec
        assert (q.spec.act_bits, q.spec.act_per_token, q.spec.restore_token_stats) == \
            (src_spec.act_bits, src_spec.act_per_token, src_spec.restore_token_stats)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = stock(x)[0], model(x)[0]
    assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())
    # the unpacked model saves as an Ultralytics checkpoint, loads back, and survives Conv+BN fusion
    reloaded, _ = load_model(save_stock_checkpoint(model, tmp_path / "bl.pt"))
    fused = reloaded.fuse()
    with torch.no_grad():
        c = fused(x)[0]
    assert float((c - b).abs().max()) <= 2e-2 * float(b.abs().max())
