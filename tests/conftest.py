"""Shared fixtures: ../shared discovery (skip when absent), a tiny generated YOLO dataset, models from yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (and its subprocesses): the workers share the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# the longest test files, started first so that the two xdist workers (pyproject addopts) finish together
SLOW_FIRST = ("test_run_sh.py", "test_original_commands.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)  # stable: each file keeps its own order
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "yolo11n.pt"
SHARED_DATA = SHARED / "datasets" / "coco128" / "coco128.yaml"


def run(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """`python ARGS...` (a root script and its flags) in a subprocess; a first argument 'yolo-tq' runs the console
    script instead."""
    cmd = [str(a) for a in args]
    cmd = cmd if cmd and cmd[0] == "yolo-tq" else [sys.executable, *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


ROOT_COMMANDS = {"train.py": "train", "train_c2psa.py": "c2psa", "train_c2psa_standard.py": "c2psa-standard",
                 "validate.py": "val", "test.py": "layers", "compression_calculation.py": "size",
                 "compare_bitlinear.py": "compare", "latency_benchmark.py": "latency", "export.py": "export"}


def run_here(*args, cwd=REPO) -> subprocess.CompletedProcess:
    """What `run` does, in this process (no interpreter start per call): the root script's command (or `yolo-tq`)
    through the same entry point as its shim, with stdout/stderr captured and any escaping exception written to stderr
    as the traceback an interpreter would print."""
    import contextlib
    import io
    import traceback

    from yolo_tq.cli import main, script

    argv = [str(a) for a in args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv[1:]) if argv[0] == "yolo-tq" else script(ROOT_COMMANDS[Path(argv[0]).name], argv[1:])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - what an interpreter would print before exiting 1
                err.write(traceback.format_exc())
                code = 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


class StopTraining(Exception):
    """Raised by a test's callback to end a training run where the test wants it to end."""


def train_first_epoch_only(cfg, number: int = 1) -> None:
    """Train stage `number` of `cfg` and stop right after its first epoch is saved (last.pt holds epoch 0), as an
    interrupted run leaves it."""
    from yolo_tq.train.stages import train_stages

    def interrupt(trainer):
        if trainer.epoch == 0:
            raise StopTraining

    with pytest.raises(StopTraining):
        train_stages(cfg, [number], callbacks={"on_model_save": interrupt})


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, no traceback, and exactly one 'error: ...' line on stderr, the last one, holding every needle.
    Returns that line."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit status {r.returncode}\n{r.stderr[-1500:]}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-1500:]
    assert err and err[-1].startswith("error:"), r.stderr[-1500:]
    assert sum(line.startswith("error:") for line in err) == 1, r.stderr[-1500:]
    for n in needles:
        assert n in err[-1], err[-1]
    return err[-1]


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"needs ../shared weights at {SHARED_WEIGHTS}")
    return SHARED_WEIGHTS


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_file():
        pytest.skip(f"needs ../shared coco128 at {SHARED_DATA}")
    return SHARED_DATA


def make_tiny_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, nc: int = 2, seed: int = 0) -> Path:
    """Images with bright rectangles on noise and YOLO labels for them; returns the data yaml path."""
    import cv2

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                c = int(rng.integers(0, nc))
                w, h = rng.integers(size // 5, size // 2, 2)
                x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
                color = (255, 64, 64) if c == 0 else (64, 255, 64)
                img[y0:y0 + h, x0:x0 + w] = color
                lines.append(f"{c} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.jpg"), img)
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    yaml_path = root / "tiny.yaml"
    names = "\n".join(f"  {i}: c{i}" for i in range(nc))
    yaml_path.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml_path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_fp_checkpoint(tmp_path_factory, tiny_data) -> Path:
    """A yolo11n built from Ultralytics' yaml (random init, nc=2), saved as an Ultralytics checkpoint."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from yolo_tq.io import save_stock_checkpoint

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=2, verbose=False)
    model.names = {0: "c0", 1: "c1"}
    model.args = {"imgsz": 64}
    path = tmp_path_factory.mktemp("tiny_ckpt") / "yolo11n_tiny.pt"
    save_stock_checkpoint(model, path)
    return path


def build_model(name: str = "yolo11n.yaml", nc: int = 80):
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(name, nc=nc, verbose=False)


def progressive_stage_plans():
    """The three StagePlans of configs/stage1_progressive.yaml (the one place the stage plan is written)."""
    from yolo_tq.config import load_config, stage_plan

    cfg = load_config(REPO / "configs" / "stage1_progressive.yaml")
    return tuple(stage_plan(cfg, s) for s in cfg.stages)


def c2psa_plan(kind: str = "bitlinear_ttq"):
    """A StagePlan that only replaces the convs inside C2PSA with BitLinear layers of `kind`."""
    from yolo_tq.plan import StagePlan
    from yolo_tq.quant.spec import QuantSpec

    return StagePlan(f"c2psa_{kind}", (), c2psa=QuantSpec(kind=kind))
