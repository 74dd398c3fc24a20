"""Faults of the machine and hostile files (the hardening issue's items 3, 6, 8 and its bad flags): each case ends in
exactly one `error: …` line on stderr, no traceback, a non-zero exit status, and every file it names unchanged
(sha256 of its bytes; a device or pipe keeps its kind; a missing output stays missing).

Commands run in this process through the shims' entry point (conftest.run_here), as tests/test_bad_inputs.py runs
them. A full disk is a small tmpfs (`mount -t tmpfs -o size=…`), filled before the cases run, and a read-only place a
tmpfs mounted read-only; where mount is not permitted those cases are skipped with the reason, and the full-disk
write is still checked with ENOSPC simulated in-process (os.fsync patched). No case trains.

Judged by design (not refused): a class name with control characters is kept (names are data; they are printed
escaped); a checkpoint that is a YOLO model of another task (segment, pose) loads (load_model's check is the
detection-model class, which those subclass).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_one_line_error, progressive_stage_plans, run_here

LINEAR_SIZE = (20000, 20000)  # the issue's payload: 1.6 GB of weights if it were ever built
LAT = ("latency_benchmark.py", "--baseline", "{fp}", "--backends", "torch", "--device", "cpu", "--num-runs", "1",
       "--warmup", "0", "--imgsz", "64", "--no-isolate", "--no-interleave")
VAL = ("validate.py", "{fp}", "--data", "{data}", "--imgsz", "64", "--device", "cpu")
POST = ("train.py", "--weights", "{fp}", "--data", "{data}", "--imgsz", "64", "--device", "cpu", "--post-training")


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple  # placeholders: see `values` in test_fault; {tmp} the case's folder
    needles: tuple
    issue: bool = False  # listed in the issue itself
    needs: tuple = field(default_factory=tuple)  # fixtures that may skip: "full", "ro", "chardev"


CASES = [
    # --- the issue's cases -----------------------------------------------------------------------------------------
    Case("safe-load-linear-20000x20000", ("test.py", "{linear_call}", "--safe-load"),
         ("refused by safe loading", "calls torch.nn.modules.linear.Linear"), issue=True),
    Case("pickled-linear-in-a-dict", ("test.py", "{linear_dict}", "--safe-load"),
         ("not a YOLO detection model", "Linear"), issue=True),
    Case("pickled-bare-linear", ("test.py", "{linear_bare}"), ("not a YOLO detection model checkpoint",), issue=True),
    Case("latency-check-images-0", (*LAT, "--check-images", "0"), ("--check-images", ">= 1"), issue=True),
    Case("latency-min-agreement-5", (*LAT, "--min-agreement", "5"), ("--min-agreement", "[0, 1]"), issue=True),
    Case("latency-calib-fraction-nan", (*LAT, "--calib-fraction", "nan"), ("--calib-fraction", "(0, 1]"), issue=True),
    Case("latency-json-empty", (*LAT, "--json", ""), ("--json", "empty path"), issue=True),
    Case("pack-disk-full", ("yolo-tq", "pack", "{tern}", "{full}/old.tq.safetensors"),
         ("no space left on device", "previous old.tq.safetensors is kept"), issue=True, needs=("full",)),
    Case("post-training-disk-full", (*POST, "{full}/old.pt"), ("no space left on device", "previous old.pt is kept"),
         issue=True, needs=("full",)),
    Case("json-disk-full", ("test.py", "{fp}", "--json", "{full}/old.json"),
         ("no space left on device", "previous old.json is kept"), issue=True, needs=("full",)),
    Case("latency-json-read-only", (*LAT, "--json", "{ro}/l.json"), ("cannot write the results JSON",), issue=True,
         needs=("ro",)),
    Case("packed-file-is-dev-zero", ("yolo-tq", "pack", "--unpack", "/dev/zero", "--out", "{tmp}/u.pt"),
         ("/dev/zero is a character device, not a regular file",), issue=True),
    Case("packed-ternary-scales-3.4e38", ("yolo-tq", "pack", "--unpack", "{bigscale}", "--out", "{tmp}/u.pt"),
         ("scales", "FP16's range"), issue=True),
    # --- more of the same kinds -------------------------------------------------------------------------------------
    Case("safe-load-floattensor-call", ("test.py", "{floattensor}", "--safe-load"), ("calls torch.FloatTensor",)),
    Case("safe-load-bytearray-call", ("test.py", "{bytearray}", "--safe-load"), ("calls builtins.bytearray",)),
    Case("safe-load-tensor-new", ("test.py", "{tensor_new}", "--safe-load"), ("creates torch.Tensor",)),
    Case("safe-load-stride-0-view", ("test.py", "{stride0}", "--safe-load"), ("10,000,000,000 elements",)),
    Case("safe-load-zip-bomb", ("test.py", "{bomb}", "--safe-load"), ("unpack to more bytes than the file holds",)),
    Case("safe-load-raw-pickle", ("test.py", "{raw_pickle}", "--safe-load"), ("not a torch.save archive",)),
    Case("safe-load-inst-opcode", ("test.py", "{inst}", "--safe-load"), ("pickle opcode INST",)),
    Case("safe-load-truncated-zip", ("test.py", "{truncated}", "--safe-load"), ("truncated or damaged",)),
    Case("classification-model", ("test.py", "{cls}"), ("not a YOLO detection model", "ClassificationModel")),
    Case("latency-min-agreement-negative", (*LAT, "--min-agreement", "-0.1"), ("--min-agreement",)),
    Case("latency-calib-fraction-0", (*LAT, "--calib-fraction", "0"), ("--calib-fraction", "got '0'")),
    Case("latency-calib-fraction-1.5", (*LAT, "--calib-fraction", "1.5"), ("--calib-fraction",)),
    Case("latency-num-runs-0", (*LAT, "--num-runs", "0"), ("--num-runs", ">= 1")),
    Case("latency-warmup-negative", (*LAT, "--warmup", "-1"), ("--warmup", ">= 0")),
    Case("latency-aa-tolerance-nan", (*LAT, "--aa-tolerance", "nan"), ("--aa-tolerance", "finite")),
    Case("latency-imgsz-100", (*LAT, "--imgsz", "100"), ("--imgsz", "multiple of 32")),
    Case("latency-workdir-read-only", (*LAT, "--workdir", "{ro}/w"), ("cannot write the exports folder",),
         needs=("ro",)),
    Case("validate-json-empty", (*VAL, "--json", ""), ("--json", "empty path")),
    Case("export-out-empty", ("export.py", "{fp}", "--out", ""), ("--out", "empty path")),
    Case("size-pack-empty", ("compression_calculation.py", "--baseline", "{fp}", "--quantized", "{tern}", "--pack",
                             ""), ("--pack", "empty path")),
    Case("pack-out-empty", ("yolo-tq", "pack", "{tern}", ""), ("argument OUT", "empty path")),
    Case("checkpoint-dir-empty", ("train.py", "--weights", "{fp}", "--data", "{data}", "--checkpoint-dir", ""),
         ("--checkpoint-dir", "empty path")),
    Case("json-is-a-fifo", ("test.py", "{fp}", "--json", "{fifo}"), ("named pipe (FIFO), not a regular file",)),
    Case("json-is-a-char-device", ("test.py", "{fp}", "--json", "{chardev}"), ("character device",),
         needs=("chardev",)),
    Case("checkpoint-is-a-fifo", ("test.py", "{fifo}"), ("named pipe (FIFO)",)),
    Case("checkpoint-is-dev-zero", ("test.py", "/dev/zero"), ("/dev/zero is a character device",)),
    Case("data-is-dev-zero", ("validate.py", "{fp}", "--data", "/dev/zero"), ("--data", "character device")),
    Case("config-is-a-fifo", ("train.py", "--config", "{fifo}"), ("--config", "named pipe")),
    Case("size-unpack-a-fifo", ("compression_calculation.py", "--unpack", "{fifo}"), ("--unpack", "named pipe")),
    Case("fetch-dev-zero", ("yolo-tq", "fetch", "/dev/zero"), ("weights is a character device",)),
    Case("unpack-disk-full", ("yolo-tq", "pack", "--unpack", "{packed}", "--out", "{full}/old.pt"),
         ("no space left on device",), needs=("full",)),
]


def test_case_count():
    """Every case of the issue, plus at least 20 more (the brief: 25 in all at least)."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.issue for c in CASES) >= 12 and sum(not c.issue for c in CASES) >= 20


# --- files and places -----------------------------------------------------------------------------------------------
class Payload:
    """A pickle that calls `fn(*args)` (REDUCE) when it is loaded."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def zip_with_pickle(path: Path, data: bytes, compress: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr(f"{path.stem}/data.pkl", data)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_fp_checkpoint) -> dict:
    """The crafted .pt files, each small (the largest is 20 kB)."""
    d = tmp_path_factory.mktemp("hostile")
    files = {
        "linear_call": {"model": Payload(torch.nn.Linear, *LINEAR_SIZE)},
        "linear_dict": {"model": torch.nn.Linear(3, 3)},
        "linear_bare": torch.nn.Linear(3, 3),
        "floattensor": {"model": Payload(torch.FloatTensor, *LINEAR_SIZE)},
        "bytearray": {"model": Payload(bytearray, 10**10)},
        "stride0": {"model": None, "x": torch.zeros(1).expand(100_000, 100_000)},
    }
    out = {}
    for name, obj in files.items():
        torch.save(obj, d / f"{name}.pt")
        out[name] = d / f"{name}.pt"
    out["bomb"] = zip_with_pickle(d / "bomb.pt", pickle.dumps({}, protocol=2) + bytes(20_000_000), compress=True)
    (d / "raw.pt").write_bytes(pickle.dumps({"model": bytearray(16)}, protocol=2))
    out["raw_pickle"] = d / "raw.pt"
    out["inst"] = zip_with_pickle(d / "inst.pt", b"(ibuiltins\nbytearray\n.")
    # torch.Tensor.__new__(torch.Tensor, 20000, 20000) (NEWOBJ), which allocates: GLOBAL, two BININT2, TUPLE2, NEWOBJ
    out["tensor_new"] = zip_with_pickle(d / "tensor_new.pt", b"\x80\x02ctorch\nTensor\nM\x20\x4eM\x20\x4e\x86\x81.")
    raw = tiny_fp_checkpoint.read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = d / "truncated.pt"
    from ultralytics.nn.tasks import ClassificationModel

    from yolo_tq.io import save_stock_checkpoint

    out["cls"] = save_stock_checkpoint(ClassificationModel("yolo11n-cls.yaml", nc=3, verbose=False), d / "cls.pt")
    return out


@pytest.fixture(scope="module")
def ternary(tmp_path_factory, tiny_fp_checkpoint) -> dict:
    """The tiny model with the three progressive stages ternarised: its stock export, packed file, and a packed file
    whose first ternary scales are 3.4e38 (finite in FP32, Inf in the FP16 the unpacked model is saved in)."""
    from safetensors.torch import save_file

    from yolo_tq.formats import metadata, reader
    from yolo_tq.formats.packed import write_packed
    from yolo_tq.io import load_model, save_stock_checkpoint
    from yolo_tq.quant.apply import export_ternary, install_stage

    d = tmp_path_factory.mktemp("ternary")
    model, _ = load_model(tiny_fp_checkpoint)
    for plan in progressive_stage_plans():
        install_stage(model, plan)
    stock = export_ternary(model).eval()
    packed = write_packed(stock, d / "m.tq.safetensors")
    tensors, meta = reader.read_packed(packed)
    key = next(k for k in tensors if k.endswith(".scales"))
    tensors[key] = torch.tensor([3.4e38, 3.4e38])
    save_file(tensors, str(d / "big.tq.safetensors"), metadata={"format": "pt", metadata.META_KEY: json.dumps(meta)})
    return {"tern": save_stock_checkpoint(stock, d / "ternary.pt"), "packed": packed,
            "bigscale": d / "big.tq.safetensors", "meta": meta, "tensors": reader.read_packed(packed)[0]}


def mount_tmpfs(where: Path, options: str) -> str | None:
    """Mount a tmpfs at `where`; the reason it could not be, or None."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs is not permitted here ({r.stderr.strip() or r.returncode})"


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    why = mount_tmpfs(where, options)
    try:
        yield why
    finally:
        if why is None:
            subprocess.run(["umount", str(where)], capture_output=True)


OLD = {"old.tq.safetensors": b"the previous packed file", "old.pt": b"the previous checkpoint",
       "old.json": b'{"previous": true}\n'}


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A 256 kB tmpfs holding the previous versions of the outputs (OLD), then filled to the last byte."""
    where = tmp_path_factory.mktemp("full") / "mnt"
    with tmpfs(where, "size=256k") as why:
        if why is None:
            for name, data in OLD.items():
                (where / name).write_bytes(data)
            with open(where / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(bytes(4096))
        yield where, why


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    where = tmp_path_factory.mktemp("ro") / "mnt"
    with tmpfs(where, "size=64k,ro") as why:
        yield where, why


@pytest.fixture
def places(tmp_path, full_disk, read_only) -> dict:
    """{fifo}, {chardev} (a /dev/null twin made with mknod, root only), {full}, {ro}; with the reasons of those
    that could not be made."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out, why = {"fifo": fifo, "full": full_disk[0], "ro": read_only[0]}, {"full": full_disk[1], "ro": read_only[1]}
    try:
        os.mknod(tmp_path / "null", 0o20666, os.makedev(1, 3))
        out["chardev"] = tmp_path / "null"
    except (PermissionError, AttributeError) as e:
        why["chardev"] = f"cannot make a device node here ({e})"
    return {"values": out, "why": why}


def fingerprint(path: Path):
    """sha256 of a regular file's bytes; (kind, device) of a device or pipe; the listing of a folder; None if
    missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if os.path.isdir(path):
        return tuple(sorted((p.name, fingerprint(p)) for p in Path(path).iterdir()))
    if not os.path.isfile(path):
        return ("special", st.st_mode, st.st_rdev)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fill(text: str, values: dict) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    return text


@pytest.fixture(autouse=True)
def safe_load_restored(monkeypatch):
    monkeypatch.setenv("YOLO_TQ_SAFE_LOAD", "0")  # --safe-load sets it for the process; teardown restores it


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case, tmp_path, tiny_fp_checkpoint, tiny_data, hostile, ternary, places):
    for need in case.needs:
        if places["why"].get(need):
            pytest.skip(places["why"][need])
    values = {"tmp": tmp_path, "fp": tiny_fp_checkpoint, "data": tiny_data, **hostile,
              **{k: v for k, v in ternary.items() if isinstance(v, Path)}, **places["values"]}
    args = [REPO / a if i == 0 and a.endswith(".py") else fill(a, values) for i, a in enumerate(case.args)]
    named = [Path(a) for a in args[1:] if "/" in str(a)] + [tmp_path]
    before = {p: fingerprint(p) for p in named}
    r = run_here(*args, cwd=tmp_path)
    assert_one_line_error(r, *case.needles)
    assert {p: fingerprint(p) for p in named} == before, "a refused run changed a file it named"


# --- the same faults below the commands ----------------------------------------------------------------------------
def one_line_of(fn, capsys) -> tuple[int, str]:
    """The exit status and the single stderr line of `fn` run as a command (cli.run_cli)."""
    from yolo_tq.cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(fn)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], err
    return e.value.code, err[0]


def test_training_checkpoint_save_on_a_full_disk(full_disk, capsys):
    """The trainer saves last.pt/best.pt through AtomicPath.write_bytes: a full disk is one line, exit 2, and the
    previous last.pt is kept."""
    from yolo_tq.io import AtomicPath

    where, why = full_disk
    if why:
        pytest.skip(why)
    last = AtomicPath(where) / "old.pt"
    before = fingerprint(last)
    code, line = one_line_of(lambda: last.write_bytes(b"x" * 100_000), capsys)
    assert code == 2 and "no space left on device" in line and "previous old.pt is kept" in line
    assert fingerprint(last) == before and sorted(p.name for p in where.iterdir()) == sorted([*OLD, "filler"])


def test_enospc_simulated_in_process_keeps_the_previous_file(tmp_path, ternary, monkeypatch, capsys):
    """Where no small filesystem can be mounted: the disk fills at fsync (as it may on NFS or with delayed
    allocation); `pack` says so in one line, keeps the previous file and leaves no temporary behind."""
    out = tmp_path / "p.tq.safetensors"
    out.write_bytes(b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    r = run_here("yolo-tq", "pack", ternary["tern"], out, cwd=tmp_path)
    assert_one_line_error(r, "no space left on device", "previous p.tq.safetensors is kept")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["p.tq.safetensors"]


def test_a_read_only_file_system_met_while_writing(read_only, capsys):
    """A write that reaches a read-only file system (no check before it) is one line naming it."""
    from yolo_tq.io import write_json

    where, why = read_only
    if why:
        pytest.skip(why)
    code, line = one_line_of(lambda: write_json({}, where / "x.json"), capsys)
    assert code == 2 and "read-only file system" in line and not (where / "x.json").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_the_safety_net_turns_a_stray_fault_into_one_line(err, tmp_path, capsys):
    """An OSError of the machine raised where no check is (Ultralytics' own writes: results.csv, plots)."""
    def fail():
        raise OSError(err, os.strerror(err), str(tmp_path / "results.csv"))

    code, line = one_line_of(fail, capsys)
    assert code == 2 and line == f"error: {os.strerror(err)}: {tmp_path / 'results.csv'}"


def test_error_lines_escape_control_characters(capsys):
    from yolo_tq.io import CheckpointError

    def fail():
        raise CheckpointError("class \x1b[31mred\x1b[0m\nerror: fake line")

    code, line = one_line_of(fail, capsys)
    assert code == 2 and "\x1b" not in line and line == "error: class \\x1b[31mred\\x1b[0m error: fake line"


@pytest.mark.parametrize("where", ["RUN_DIR", "SAVED_MODELS"])
def test_run_sh_refuses_an_unwritable_folder_before_any_step(where, tmp_path, read_only):
    """One line and exit 2 before the first step: nothing is created, nothing runs (RUN_DIR on a read-only place
    gave raw mkdir errors three times over)."""
    ro, why = read_only
    place = ro if why is None else Path("/proc/1") if os.geteuid() == 0 else None
    if place is None:
        pytest.skip(why)
    env = {**os.environ, "RUN_DIR": str(tmp_path / "run"), "SAVED_MODELS": str(tmp_path / "saved"),
           "WEIGHTS": str(tmp_path / "none.pt"), where: str(place / "x")}
    r = subprocess.run(["bash", str(REPO / "run.sh"), "quick", "n"], env=env, capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot write {where}"), r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == [] and not (place / "x").exists()


# --- printable output (item 8) --------------------------------------------------------------------------------------
def test_class_names_from_a_packed_file_are_printed_escaped(tmp_path, ternary, tiny_data):
    """A packed file whose class names hold terminal escapes and a forged line: after unpacking, validate --per-class
    prints them escaped, on their own row, and no line of its output starts with 'error:'."""
    from safetensors.torch import save_file

    from yolo_tq.formats import metadata

    meta = {**ternary["meta"], "names": {"0": "ok\x1b[31mRED\x1b[0m\nerror: fake line", "1": "c1"}}
    packed = tmp_path / "names.tq.safetensors"
    save_file(ternary["tensors"], str(packed), metadata={"format": "pt", metadata.META_KEY: json.dumps(meta)})
    assert run_here("yolo-tq", "pack", "--unpack", packed, "--out", tmp_path / "names.pt", cwd=tmp_path).returncode == 0
    r = run_here("validate.py", tmp_path / "names.pt", "--data", tiny_data, "--imgsz", "64", "--batch", "2",
                 "--device", "cpu", "--per-class", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\x1b" not in r.stdout and not any(line.startswith("error:") for line in r.stdout.splitlines())
    assert "ok\\x1b[31mRED\\x1b[0m\\nerror: fake line" in r.stdout


def test_the_packer_refuses_ternary_scales_beyond_fp16():
    """It never writes a file its loader refuses."""
    from yolo_tq.formats.codes import PackError
    from yolo_tq.formats.packed import ternary_entries

    with pytest.raises(PackError, match="beyond the FP16 range"):
        ternary_entries("w", torch.tensor([[1e6, 0.0, -1e6]]))


def test_safe_load_builds_nothing_of_a_refused_file(hostile, monkeypatch):
    """The Linear(20000, 20000) pickle is refused before torch.load: Linear.__init__ never runs."""
    from yolo_tq.io import CheckpointError, load_model

    calls = []
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda self, *a, **k: calls.append(a))
    with pytest.raises(CheckpointError, match="refused by safe loading"):
        load_model(hostile["linear_call"], safe=True)
    assert calls == []
