"""Safety of files and runs: safe checkpoint loading, NaN/Inf refusal, the stage lock, atomic checkpoint writes,
resume errors, SIGTERM during training, and no leftovers from a failed start (tiny generated data, CPU)."""

import copy
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from yolo_tq.config import load_config, stage_outputs
from yolo_tq.io import AtomicPath, CheckpointError, atomic_save, load_model, save_stock_checkpoint
from yolo_tq.quant.layers import BitConv2d, TTQConv2d
from yolo_tq.train.guard import StageLock, StageLockedError, StageRun, command_line
from yolo_tq.train.stages import train_stages

from conftest import REPO, build_model, c2psa_plan, progressive_stage_plans
from test_training import write_config


def live_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_fp_checkpoint, tiny_data):
    """Stage 1 trained for 2 epochs; at each save, the EMA as Ultralytics serialises it and last.pt's bytes."""
    tmp = tmp_path_factory.mktemp("safety")
    cfg = load_config(write_config(tmp, tiny_fp_checkpoint, tiny_data, epochs=2))
    saves = []

    def capture(trainer):
        ema = copy.deepcopy(trainer.ema.ema).half().state_dict()
        saves.append({"path_type": type(trainer.last), "ema": ema, "epoch": trainer.epoch,
                      "last": torch.load(trainer.last, map_location="cpu", weights_only=False)})

    train_stages(cfg, [1], callbacks={"on_model_save": capture})
    return cfg, saves


# --- safe loading -------------------------------------------------------------------------------------------------

def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safe_load_accepts_training_checkpoints(trained):
    cfg, _ = trained
    out = stage_outputs(cfg, cfg.stages[0])
    for key in ("best", "last", "ternary"):
        safe, ckpt = load_model(getattr(out, key), safe=True)
        assert_same_weights(safe, load_model(getattr(out, key), safe=False)[0])
        assert isinstance(ckpt.get("train_args"), dict)
    assert any(isinstance(m, TTQConv2d) for m in load_model(out.best, safe=True)[0].modules())


@pytest.mark.parametrize("kind", ["bitlinear_ttq", "bitlinear_standard"])
def test_safe_load_accepts_bitlinear_and_ttq_layers(tmp_path, kind):
    from yolo_tq.quant.apply import install_stage

    model = build_model(nc=2)
    install_stage(model, progressive_stage_plans()[0])
    install_stage(model, c2psa_plan(kind))
    path = atomic_save({"model": None, "ema": model.half(), "train_args": {"ttq": {"stage": {"name": "x"}}},
                        "epoch": 0}, tmp_path / "last.pt")
    safe, _ = load_model(path, safe=True)
    assert sum(isinstance(m, BitConv2d) for m in safe.modules()) > 0
    assert_same_weights(safe, load_model(path, safe=False)[0])


def test_safe_load_accepts_stock_yolo11n(shared_weights):
    safe, _ = load_model(shared_weights, safe=True)
    assert_same_weights(safe, load_model(shared_weights, safe=False)[0])


class Payload:
    """A pickle that calls `fn(arg)` when it is loaded."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "exec", "raw-pickle"])
def test_safe_load_refuses_code_and_runs_nothing(tmp_path, monkeypatch, how):
    marker = tmp_path / "pwned"
    payload = (Payload(exec, f"open({str(marker)!r}, 'w').close()") if how == "exec"
               else Payload(os.system, f"touch {shlex.quote(str(marker))}"))
    path = tmp_path / "evil.pt"
    if how == "raw-pickle":
        import pickle

        path.write_bytes(pickle.dumps({"model": payload}))
    else:
        torch.save({"model": payload, "train_args": {}}, path)
    if how != "raw-pickle":  # the file really runs code when opened the ordinary way
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    monkeypatch.setenv("YOLO_TQ_SAFE_LOAD", "1")
    with pytest.raises(CheckpointError) as e:
        load_model(path)  # safe mode from the environment
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "safe loading" in msg
    if how != "raw-pickle":
        assert {"os.system": f"{os.system.__module__}.system", "exec": "builtins.exec"}[how] in msg


@pytest.mark.parametrize("script", ["test.py", "validate.py"])
def test_safe_load_flag_refuses_code_through_the_commands(tmp_path, monkeypatch, script, tiny_data):
    from conftest import assert_one_line_error, run_here

    monkeypatch.setenv("YOLO_TQ_SAFE_LOAD", "0")  # off before; --safe-load turns it on; teardown removes it again
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(os.system, f"touch {shlex.quote(str(marker))}"), "train_args": {}}, tmp_path / "e.pt")
    extra = ["--data", str(tiny_data), "--imgsz", "64"] if script == "validate.py" else []
    r = run_here(script, str(tmp_path / "e.pt"), *extra, "--safe-load", cwd=tmp_path)
    assert_one_line_error(r, "refused by safe loading")
    assert not marker.exists() and os.environ["YOLO_TQ_SAFE_LOAD"] == "1"  # the flag set it for this process


# --- NaN / Inf ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["model.0.conv.weight", "model.0.bn.running_var"])
def test_nan_or_inf_weights_are_refused(tmp_path, where):
    model = build_model(nc=2)
    with torch.no_grad():
        model.state_dict()[where].view(-1)[3] = float("nan") if "weight" in where else float("inf")
    path = save_stock_checkpoint(model, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=where.replace(".", r"\.")):
        load_model(path)


def test_flipped_bytes_giving_nan_are_refused(tmp_path):
    path = save_stock_checkpoint(build_model(nc=2), tmp_path / "ok.pt")
    load_model(path)
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the tensor's bytes (stored uncompressed)
    start += 2 * (info.file_size // 4)  # the middle of the largest (fp16) tensor
    raw[start:start + 8] = b"\xff" * 8  # 0xffff is a NaN in fp16
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="NaN or Inf|cannot read"):
        load_model(bad)


# --- the stage lock -----------------------------------------------------------------------------------------------

def test_second_run_refused_while_a_live_process_holds_the_lock(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg_path = write_config(tmp_path, tiny_fp_checkpoint, tiny_data, epochs=1)
    folder = stage_outputs(load_config(cfg_path), load_config(cfg_path).stages[0]).dir
    (folder / "weights").mkdir(parents=True)
    files = {folder / "args.yaml": "first run", folder / "weights" / "last.pt": "first", folder / "results.csv": "x"}
    for f, text in files.items():
        f.write_text(text)
    holder = live_process()
    try:
        (folder / ".lock").write_text(f"{holder.pid}\n")
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
        res = subprocess.run([sys.executable, "train.py", "--config", str(cfg_path), "--stage", "1"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    finally:
        holder.kill()
        holder.wait()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and f"PID {holder.pid}" in lines[0], lines
    assert after == before


def test_lock_between_two_holders_in_one_process(tmp_path):
    first = StageLock(tmp_path / "stage").acquire()
    with pytest.raises(StageLockedError, match=f"PID {os.getpid()}"):
        StageLock(tmp_path / "stage").acquire()
    first.release()
    assert not (tmp_path / "stage" / ".lock").exists()
    StageLock(tmp_path / "stage").acquire().release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    lock_file = tmp_path / "stage" / ".lock"
    lock_file.parent.mkdir()
    pid = dead_pid()
    lock_file.write_text(f"{pid}\n")
    lock = StageLock(lock_file.parent).acquire()
    assert int(lock_file.read_text().split()[0]) == os.getpid()
    lock.release()
    assert not lock_file.exists()


# --- atomic checkpoint writes -------------------------------------------------------------------------------------

def test_atomic_path_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    target = AtomicPath(tmp_path / "weights") / "last.pt"
    assert isinstance(target, AtomicPath)
    target.write_bytes(b"complete old checkpoint")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        target.write_bytes(b"new" * 1000)
    assert target.read_bytes() == b"complete old checkpoint"
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]


def test_training_checkpoints_go_through_the_atomic_writer_unchanged(trained):
    cfg, saves = trained
    out = stage_outputs(cfg, cfg.stages[0])
    assert [s["epoch"] for s in saves] == [0, 1]
    for s in saves:
        assert s["path_type"] is AtomicPath
        assert s["last"]["epoch"] == s["epoch"]
        saved = s["last"]["ema"].state_dict()
        assert saved.keys() == s["ema"].keys()
        for k, v in s["ema"].items():
            assert torch.equal(saved[k], v), k
    assert sorted(p.name for p in (out.dir / "weights").iterdir()) == ["best.pt", "last.pt"]  # no temporaries
    assert not (out.dir / ".lock").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert oct(out.last.stat().st_mode & 0o777) == oct(0o666 & ~umask)  # as open() makes it, not 0600


# --- resume errors ------------------------------------------------------------------------------------------------

def copy_stage(trained, tmp_path) -> tuple:
    cfg, _ = trained
    src = stage_outputs(cfg, cfg.stages[0])
    cfg2 = load_config(write_config(tmp_path, Path(cfg.base.weights), Path(cfg.base.data), epochs=2))
    dst = stage_outputs(cfg2, cfg2.stages[0])
    shutil.copytree(src.dir, dst.dir)
    return cfg2, dst


def test_resume_of_a_finished_stage_says_so(trained, tmp_path):
    cfg, out = copy_stage(trained, tmp_path)
    with pytest.raises(CheckpointError, match="finished training") as e:
        train_stages(cfg, [1], resume=True)
    assert "\n" not in str(e.value)
    assert out.best.is_file()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_of_a_damaged_last_pt_names_it_and_best_pt(trained, tmp_path, damage):
    cfg, out = copy_stage(trained, tmp_path)
    data = out.last.read_bytes()
    out.last.write_bytes(b"" if damage == "empty" else data[: len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        train_stages(cfg, [1], resume=True)
    msg = str(e.value)
    assert "\n" not in msg and str(out.last) in msg and "cannot resume stage 1" in msg
    assert f"--start {out.best}" in msg
    assert {"empty": "is empty (0 bytes)", "truncated": "truncated or damaged"}[damage] in msg


# --- SIGTERM ------------------------------------------------------------------------------------------------------

HOOK = textwrap.dedent("""
    import os, runpy, signal, sys
    from ultralytics.utils.callbacks.base import default_callbacks
    default_callbacks["on_model_save"].append(lambda tr: tr.epoch == 0 and os.kill(os.getpid(), signal.SIGTERM))
    sys.argv = ["train.py", "--config", sys.argv[1], "--stage", "1"]
    runpy.run_path("train.py", run_name="__main__")
    """)


def test_sigterm_prints_one_line_exits_143_and_resumes(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg_path = write_config(tmp_path, tiny_fp_checkpoint, tiny_data, epochs=2)
    out = stage_outputs(load_config(cfg_path), load_config(cfg_path).stages[0])
    env = {**os.environ, "YOLO_TQ_SAFE_LOAD": "1"}  # and the whole run loads weights_only
    res = subprocess.run([sys.executable, "-c", HOOK, str(cfg_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 143, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if "SIGTERM" in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    assert f"saved {out.last} (epoch 1/2)" in lines[0]
    resume = lines[0].split("resume with: ")[1]
    assert resume == shlex.join(["python", "train.py", "--config", str(cfg_path), "--stage", "1", "--resume"])
    assert load_model(out.last, safe=True)[1]["epoch"] == 0 and not (out.dir / ".lock").exists()
    cmd = shlex.split(resume)
    res = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len((out.dir / "results.csv").read_text().strip().splitlines()) == 1 + 2
    assert out.ternary.is_file()


def test_sigint_before_any_checkpoint_says_nothing_saved_and_exits_130(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--stage", "2"])
    before = signal.getsignal(signal.SIGINT)
    run = StageRun(tmp_path / "ckpt" / "yolo11n" / "stage2", 2)
    with pytest.raises(SystemExit) as e:
        with run.guard():
            assert (run.folder / ".lock").is_file()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted by SIGINT before the first epoch ended: nothing saved; start again with: "
        "python train.py --stage 2"]
    assert not (tmp_path / "ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is before


# --- failed starts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["bad data", "bad start checkpoint"])
def test_failed_start_leaves_nothing_behind(tmp_path, tiny_fp_checkpoint, tiny_data, failure):
    start = None
    if failure == "bad data":
        data = tmp_path / "bad.yaml"
        data.write_text(f"path: {tmp_path}\ntrain: missing/images\nval: missing/images\nnames:\n  0: a\n")
    else:
        data, start = tiny_data, str(tmp_path / "garbage.pt")
        Path(start).write_bytes(b"not a checkpoint")
    cfg = load_config(write_config(tmp_path, tiny_fp_checkpoint, data, epochs=1))
    with pytest.raises(Exception):
        train_stages(cfg, [1], start=start)
    assert not Path(cfg.base.checkpoint_dir).exists()


def test_failed_start_keeps_a_folder_that_held_files(tmp_path, tiny_fp_checkpoint):
    data = tmp_path / "bad.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: missing/images\nval: missing/images\nnames:\n  0: a\n")
    cfg = load_config(write_config(tmp_path, tiny_fp_checkpoint, data, epochs=1))
    folder = stage_outputs(cfg, cfg.stages[0]).dir
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(Exception):
        train_stages(cfg, [1])
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (folder / ".lock").exists()


# --- the command that resumes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, orig, kwargs, expected", [
    (["train.py", "--config", "c.yaml", "--stage", "all", "--start", "x.pt", "--epochs", "3"],
     ["python3", "-u", "train.py"], {"stage_number": 2, "resume": True},
     "python3 -u train.py --config c.yaml --stage 2 --epochs 3 --resume"),
    (["/usr/bin/yolo-tq", "train", "--stage=1", "--resume"], ["/usr/bin/python", "/usr/bin/yolo-tq"],
     {"stage_number": 1, "start": "w/best.pt"}, "yolo-tq train --stage 1 --start w/best.pt"),
    (["train_c2psa.py", "--model", "a b.pt", "--resume"], ["python", "train_c2psa.py"],
     {"stage_number": 1, "start": "a b.pt", "start_flag": "--model"}, "python train_c2psa.py --model 'a b.pt'"),
    (["train.py", "--stage", "all", "--start=x.pt"], ["python", "train.py"], {"stage_number": 1, "keep_start": True},
     "python train.py --stage 1 --start=x.pt"),
    (["train.py", "--stage", "all", "--start=x.pt"], ["python", "train.py"], {"stage_number": 3},
     "python train.py --stage 3"),
])
def test_command_line(monkeypatch, argv, orig, kwargs, expected):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig + argv[1:])
    assert command_line(**kwargs) == expected
