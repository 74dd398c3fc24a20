"""The deployable ONNX (formats.deploy_onnx, deploy.deployable, `yolo-tq export`): the code math against hand-worked
values, exact decoding in onnxruntime, the decoders folded at load, the command end to end on a tiny yaml-built
model, its errors, and (with ../shared) the yolo11n stage-1 post-training model against PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from conftest import REPO, assert_one_line_error, progressive_stage_plans, run_here
from yolo_tq.formats import deploy_onnx as dx
from yolo_tq.formats.codes import pack_trits, unpack_trits

STAGE_PLANS = progressive_stage_plans()


# ------------------------------------------------------------------------------------------------------- math
def test_channel_table_hand_example():
    w = np.array([[[[0.5]], [[0.0]], [[-0.25]]],   # channel 0: {-0.25, 0, 0.5}
                  [[[0.0]], [[-1.0]], [[-1.0]]],   # channel 1: negative only
                  [[[0.0]], [[0.0]], [[0.0]]]],    # channel 2: all zero
                 dtype=np.float32)
    table = dx.channel_ternary_table(w)
    np.testing.assert_array_equal(table, [[0.5, -0.25], [0.0, -1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(dx.ternary_codes(w, table), [1, 0, 2, 0, 2, 2, 0, 0, 0])
    w[0, 1] = 0.3  # a second positive value in channel 0
    assert dx.channel_ternary_table(w) is None
    assert dx.channel_ternary_table(np.array([[np.nan, 0.0]], np.float32)) is None


def test_trit_lut_is_the_packed_format_inverse():
    lut = dx.trit_lut()
    assert lut.shape == (243, 5)
    np.testing.assert_array_equal(lut[0], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(lut[1 + 2 * 3 + 1 * 81], [1, 2, 0, 0, 1])  # 1*1 + 2*3 + 0*9 + 0*27 + 1*81
    codes = torch.randint(0, 3, (1000,), generator=torch.Generator().manual_seed(0))
    packed = pack_trits(codes).numpy()
    np.testing.assert_array_equal(lut[packed.astype(np.int64)].reshape(-1)[:1000], unpack_trits(torch.from_numpy(packed),
                                                                                                1000).numpy())


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (7, 5, 1, 1), (3, 1, 3, 3)])
def test_numpy_decoder_round_trip_is_exact(shape):
    g = np.random.default_rng(1)
    codes = g.integers(0, 3, shape)
    pos, neg = g.random(shape[0]).astype(np.float32), -g.random(shape[0]).astype(np.float32)
    pos[0], neg[-1] = 0.0, 0.0  # a channel without positives, one without negatives
    w = np.where(codes == 1, pos.reshape(-1, 1, 1, 1), np.where(codes == 2, neg.reshape(-1, 1, 1, 1), 0)).astype(np.float32)
    table = dx.channel_ternary_table(w)
    packed = pack_trits(torch.from_numpy(dx.ternary_codes(w, table))).numpy()
    np.testing.assert_array_equal(dx.decode_ternary_np(packed, table, shape), w)


# ----------------------------------------------------------------------------------------------------- graphs
class TwoConvs(nn.Module):
    """A ternary 3x3 conv (per-channel magnitudes, as after a BN fold) and a dense 1x1 conv, with biases."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        codes = torch.randint(-1, 2, self.a.weight.shape, generator=g).float()
        mag_p, mag_n = torch.rand(8, 1, 1, 1, generator=g) + 0.1, torch.rand(8, 1, 1, 1, generator=g) + 0.1
        with torch.no_grad():
            self.a.weight.copy_(torch.where(codes > 0, mag_p, torch.where(codes < 0, -mag_n, torch.zeros(()))))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "two.onnx"
    torch.onnx.export(TwoConvs().eval(), torch.rand(1, 3, 16, 16), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])
    return onnx.load(str(path))


def _run(model: onnx.ModelProto, x: np.ndarray, **so_entries) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in so_entries.items():
        setattr(so, k, v)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("rest", dx.REST_CHOICES)
def test_encoded_graph_decodes_exactly_and_runs(small_onnx, rest):
    enc, done = dx.encode_model(small_onnx, rest)
    onnx.checker.check_model(enc, full_check=True)
    kinds = {e.name: e.kind for e in done}
    assert kinds["a.weight"] == "ternary"
    assert kinds.get("b.weight") == {"int8": "int8", "fp16": "fp16", "fp32": None}[rest]
    errs = dx.verify_encoding(small_onnx, enc, done)
    assert errs["max_rel_error_ternary"] == 0.0
    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    ref, got = _run(small_onnx, x), _run(enc, x)
    if rest == "fp32":
        np.testing.assert_array_equal(got, ref)  # ternary decoding is exact, the rest untouched
    else:
        assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert dx.read_summary(enc)["ternary"]["tensors"] == 1
    with pytest.raises(dx.DeployOnnxError, match="already"):
        dx.encode_model(enc, rest)


def test_decoders_are_folded_by_default_session_options(small_onnx, tmp_path):
    """onnxruntime with default options (as YOLO(path) opens it) folds every decoder at load: the optimised
    graph holds the model's own operators only."""
    enc, _ = dx.encode_model(small_onnx, "int8")
    opt = tmp_path / "optimized.onnx"
    _run(enc, np.zeros((1, 3, 16, 16), np.float32), optimized_model_filepath=str(opt))
    ops = {n.op_type for n in onnx.load(str(opt)).graph.node}
    assert not ops & {"Gather", "GatherElements", "Cast", "Pad", "Slice"}, ops
    assert "Conv" in ops or "FusedConv" in ops


def test_short_names_keep_the_function(small_onnx):
    enc, _ = dx.encode_model(small_onnx, "int8")
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    before, size = _run(enc, x), enc.ByteSize()
    dx.short_names(enc)
    onnx.checker.check_model(enc)
    assert np.array_equal(_run(enc, x), before) and enc.ByteSize() < size
    assert all(len(t.name) <= 2 for t in enc.graph.initializer) and dx.read_summary(enc) is not None


def test_verification_catches_a_wrong_code(small_onnx):
    enc, done = dx.encode_model(small_onnx, "int8")
    codes = next(t for t in enc.graph.initializer if t.name == "a.weight.codes")
    raw = bytearray(codes.raw_data)
    raw[0] = (raw[0] + 1) % 243
    codes.raw_data = bytes(raw)
    with pytest.raises(dx.DeployOnnxError, match="a.weight"):
        dx.verify_encoding(small_onnx, enc, done)


def test_old_opset_is_refused(small_onnx):
    old = onnx.ModelProto()
    old.CopyFrom(small_onnx)
    old.opset_import[0].version = 11
    with pytest.raises(dx.DeployOnnxError, match="opset 11"):
        dx.encode_model(old)


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_models(tiny_fp_checkpoint, tmp_path_factory):
    """The tiny yaml-built model ternarised after training (stages 1-3, stock export), and with BitLinear_TTQ in
    C2PSA on top."""
    from conftest import c2psa_plan
    from yolo_tq.io import load_model, save_stock_checkpoint
    from yolo_tq.quant.apply import export_ternary, install_stage

    d = tmp_path_factory.mktemp("deploy")
    model, _ = load_model(tiny_fp_checkpoint)
    for plan in STAGE_PLANS:
        install_stage(model, plan)
    ternary = save_stock_checkpoint(export_ternary(model), d / "ternary.pt")
    install_stage(model, c2psa_plan())
    bitlinear = save_stock_checkpoint(export_ternary(model), d / "bitlinear.pt")
    return {"fp": tiny_fp_checkpoint, "ternary": ternary, "bitlinear": bitlinear}


def export(*args, cwd=REPO):
    return run_here("export.py", *args, cwd=cwd)


def torch_output(ckpt, x: np.ndarray) -> np.ndarray:
    from yolo_tq.deploy.backends import target

    return target("torch-cpu").runner(ckpt).infer(x)


@pytest.mark.parametrize("kind, n_ternary", [("ternary", 34), ("bitlinear", 39), ("fp", 0)])
def test_export_round_trips_through_onnxruntime(tiny_models, tmp_path, kind, n_ternary):
    import onnxruntime as ort

    out, js = tmp_path / f"{kind}.onnx", tmp_path / f"{kind}.json"
    r = export(tiny_models[kind], "--out", out, "--imgsz", 64, "--json", js, "--rest", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ternary layers: {n_ternary} (fused PyTorch model: {n_ternary})" in r.stdout
    rep = json.loads(js.read_text())
    assert rep["bytes"] == out.stat().st_size and rep["decode_errors"].get("max_rel_error_ternary", 0.0) == 0.0
    assert rep["pytorch_weight_rel_error"] == 0.0 and rep["pytorch_weights_compared"] == min(n_ternary, 34)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    ref = torch_output(tiny_models[kind], x)
    tol = 0.5 if kind == "bitlinear" else 1e-3  # BitLinear rounds activations (docs/method.md, Agreement)
    assert np.abs(got - ref).max() < tol * max(1.0, np.abs(ref).max())
    written = onnx.load(str(out))
    meta = {p.key: p.value for p in written.metadata_props}
    assert meta["names"] == str({0: "c0", 1: "c1"}) and meta["imgsz"] == "[64, 64]"
    assert json.loads(meta["yolo_tq"])["ternary"]["tensors"] == n_ternary
    g = written.graph  # short names everywhere but the graph's own inputs and outputs (dx.short_names)
    assert max(len(t.name) for t in g.initializer) <= 3 and not any(n.name for n in g.node)
    assert [x.name for x in g.input] == ["images"] and [x.name for x in g.output] == ["output0"]


def test_int8_rest_is_smaller_and_stock_ultralytics_runs_it(tiny_models, tmp_path):
    """The file runs through `ultralytics.YOLO(path)` in a process where yolo_tq cannot be imported."""
    sizes = {}
    for rest in ("int8", "fp32"):
        out = tmp_path / f"t_{rest}.onnx"
        r = export(tiny_models["ternary"], "--out", out, "--imgsz", 64, "--rest", rest)
        assert r.returncode == 0, r.stderr[-2000:]
        sizes[rest] = out.stat().st_size
    assert sizes["int8"] < 0.5 * sizes["fp32"]
    code = ("import sys; sys.modules['yolo_tq'] = None\n"
            "from ultralytics import YOLO\nimport numpy as np\n"
            f"m = YOLO({str(tmp_path / 't_int8.onnx')!r}, task='detect')\n"
            "r = m.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)\n"
            "print('names', r[0].names)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "names {0: 'c0', 1: 'c1'}" in p.stdout


def test_export_leaves_no_temporary_folder(tiny_models, tmp_path, monkeypatch):
    """Without --workdir the intermediate files go to a temporary folder that is removed, after success and after a
    refused export alike; with --workdir they stay there."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ok = export(tiny_models["ternary"], "--out", tmp_path / "t.onnx", "--imgsz", 64, "--json", tmp_path / "t.json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["fp_onnx"] == ""
    from ultralytics.nn.tasks import ClassificationModel

    from yolo_tq.io import save_stock_checkpoint

    cls = save_stock_checkpoint(ClassificationModel("yolo11n-cls.yaml", nc=3, verbose=False), tmp_path / "cls.pt")
    assert export(cls, "--out", tmp_path / "c.onnx", "--imgsz", 64).returncode != 0
    assert list(temp.iterdir()) == []
    kept = export(tiny_models["ternary"], "--out", tmp_path / "k.onnx", "--imgsz", 64, "--workdir", tmp_path / "w")
    assert kept.returncode == 0 and list((tmp_path / "w").rglob("*.onnx")) and list(temp.iterdir()) == []


def test_packed_file_exports(tiny_models, tmp_path):
    from yolo_tq.formats.packed import write_packed
    from yolo_tq.io import load_model

    model, _ = load_model(tiny_models["ternary"])
    packed = write_packed(model, tmp_path / "m.tq.safetensors")
    r = export(packed, "--imgsz", 64)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ternary layers: 34" in r.stdout and (tmp_path / "m.onnx").is_file()


def test_export_errors(tiny_models, tmp_path):
    from ultralytics.nn.tasks import ClassificationModel

    from yolo_tq.io import save_stock_checkpoint

    cls = save_stock_checkpoint(ClassificationModel("yolo11n-cls.yaml", nc=3, verbose=False), tmp_path / "cls.pt")
    assert_one_line_error(export(cls, "--out", tmp_path / "c.onnx", "--imgsz", 64), "not a YOLO detection model")
    assert not (tmp_path / "c.onnx").exists()
    src = tiny_models["ternary"]
    before = src.read_bytes()
    assert_one_line_error(export(src, "--out", src), "it is the input")
    assert src.read_bytes() == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(export(src, "--out", blocker / "x.onnx"), "cannot write")
    assert_one_line_error(export(tmp_path / "missing.pt"), "not found")
    assert_one_line_error(export(src, "--imgsz", 100), "multiple of 32")


# ------------------------------------------------------------------------------------------------ ../shared
def test_shared_stage1_onnx_gives_pytorchs_detections(shared_weights, shared_data, tmp_path):
    """yolo11n with stage 1 ternarised after training: the deployable ONNX (INT8 rest) finds the detections the
    PyTorch model finds on real val images, and its ternary weights are PyTorch's fused weights exactly."""
    from yolo_tq.eval.agreement import check_inputs, compare_outputs
    from yolo_tq.deploy.deployable import export_deployable
    from yolo_tq.io import load_model, save_stock_checkpoint
    from yolo_tq.quant.apply import ternarize_

    model, _ = load_model(shared_weights)
    n = len(ternarize_(model, STAGE_PLANS[:1]))
    ckpt = save_stock_checkpoint(model, tmp_path / "stage1_ptq.pt")
    r = export_deployable(ckpt, tmp_path / "stage1.onnx", imgsz=320, data=str(shared_data), log=lambda s: None)
    assert r.encoding["ternary"]["tensors"] == r.ternary_convs_model == n == 15
    assert r.pytorch_weight_rel_error == 0.0 and r.pytorch_weights_compared == n
    import onnxruntime as ort

    inputs = check_inputs(str(shared_data), 320, 1, 8)
    s = ort.InferenceSession(str(tmp_path / "stage1.onnx"), providers=["CPUExecutionProvider"])
    outs = [s.run(None, {"images": x})[0] for x in inputs]
    refs = [torch_output(ckpt, x) for x in inputs]
    a = compare_outputs(refs, outs, "int8")
    assert a.passed and a.det_agreement >= 0.95 and a.sure_detections >= 5, a


# --------------------------------------------------------------------------------- TensorRT (mocked) and ORT
class _FakeTensorRT:
    """What build_tensorrt_engine uses of the tensorrt module; `refuse`: the parser reports an error."""

    __version__ = "10.mock"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class BuilderFlag:
        FP16 = "fp16"

    def __init__(self, refuse: bool):
        fake = self

        class Parser:
            num_errors = 1 if refuse else 0

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                fake.parsed = data
                return not refuse

            def get_error(self, i):
                return "In node 7 (GatherElements): UNSUPPORTED_NODE"

        class Config:
            def set_flag(self, flag):
                fake.flags = [flag]

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                return b"ENGINE-BYTES"

        self.OnnxParser, self.Builder = Parser, Builder


@pytest.mark.parametrize("refuse", [False, True])
def test_tensorrt_engine_or_its_refusal(tiny_models, tmp_path, monkeypatch, refuse):
    from ultralytics.nn.backends.base import BaseBackend

    from yolo_tq.commands import export as export_command

    fake = _FakeTensorRT(refuse)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(export_command, "tensorrt_available", lambda: True)
    out = tmp_path / "m.onnx"
    r = export(tiny_models["ternary"], "--out", out, "--imgsz", 64, "--tensorrt")
    assert fake.parsed == out.read_bytes()  # TensorRT parsed the deployable file itself
    line = r.stdout.strip().splitlines()[-1]
    if refuse:
        assert r.returncode == 1 and line == ("TensorRT 10.mock refused the ONNX: In node 7 (GatherElements): "
                                              "UNSUPPORTED_NODE")
        assert not out.with_suffix(".engine").exists()
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert fake.flags == ["fp16"] and line.endswith(str(out.with_suffix(".engine")))
        offset, meta = BaseBackend.engine_header(out.with_suffix(".engine"))
        assert meta["names"] == str({0: "c0", 1: "c1"}) and meta["stride"] == 32
        assert out.with_suffix(".engine").read_bytes()[offset:] == b"ENGINE-BYTES"


def test_tensorrt_missing_is_one_line_before_any_work(tiny_models, tmp_path, monkeypatch):
    from yolo_tq.commands import export as export_command

    monkeypatch.setattr(export_command, "tensorrt_available", lambda: False)
    r = export(tiny_models["ternary"], "--out", tmp_path / "m.onnx", "--imgsz", 64, "--tensorrt")
    assert_one_line_error(r, "--tensorrt needs TensorRT")
    assert not (tmp_path / "m.onnx").exists()


def test_old_onnxruntime_gets_one_line(tiny_models, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.16.3")
    r = export(tiny_models["ternary"], "--out", tmp_path / "m.onnx", "--imgsz", 64)
    assert_one_line_error(r, "onnxruntime 1.16.3 is too old", ">= 1.19")
