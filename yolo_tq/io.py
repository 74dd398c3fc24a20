"""Files: the one atomic writer, and checkpoint I/O (one format: Ultralytics' pickled-model dict).

Opening a `.pt` file unpickles it, and unpickling runs whatever code the file names: open a stranger's checkpoint
only in safe mode. Safe mode (YOLO_TQ_SAFE_LOAD=1, `set_safe_load(True)`, or `load_model(path, safe=True)`;
Ultralytics' own ULTRALYTICS_SAFE_LOAD=1 turns it on too) loads with `torch.load(weights_only=True)` and accepts only
the classes of `safe_globals()`: torch.nn, Ultralytics' model modules, this project's quantized layers and specs, and
the plain data types their checkpoints hold. A file that names anything else is refused before any of it is
unpickled, and Ultralytics builds models from their yaml without eval while it loads. First, the file's pickles are
read as opcodes (yolo_tq.pickle_scan): what they would build must stay within what the file's bytes hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib
import io
import json
import os
import pickle
import pkgutil
import re
import stat
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from .pickle_scan import Damaged, Refused, check_archive

MODEL_SIZES = ("n", "s", "m", "l", "x")  # YOLO11's scales (Ultralytics' yolo11{size}.yaml)
SAFE_LOAD_ENV = "YOLO_TQ_SAFE_LOAD"
_TRUE = ("1", "true", "yes", "on")
# every nn.Module subclass (and dataclass) defined in these packages' modules, or in these modules, is allowed
_SAFE_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules")
_SAFE_MODULES = ("ultralytics.nn.tasks", "yolo_tq.quant.layers", "yolo_tq.quant.spec")
_PROJECT_PREFIX = "yolo_tq."
# errno -> the line a failed write gives (the machine, not the input, is at fault)
WRITE_FAULTS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EFBIG: "file too large", errno.EIO: "input/output error"}
_SPECIAL_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, damaged, or of the wrong model."""


class RunFailedError(RuntimeError):
    """A run that failed on its own (a non-finite training loss): one line and exit status 1, nothing written."""


class OutputPathError(ValueError):
    """An output that cannot be written (under a file, a folder where a file goes, no permission)."""


def set_safe_load(on: bool = True) -> None:
    """Safe checkpoint loading for this process and the processes it starts (DDP workers): YOLO_TQ_SAFE_LOAD."""
    os.environ[SAFE_LOAD_ENV] = "1" if on else "0"


def safe_load_enabled() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in (SAFE_LOAD_ENV, "ULTRALYTICS_SAFE_LOAD"))


def _classes_of(module) -> dict[str, type]:
    """The nn.Module subclasses and dataclasses that `module` defines, by their pickled name."""
    return {f"{v.__module__}.{v.__qualname__}": v for v in vars(module).values()
            if isinstance(v, type) and v.__module__ == module.__name__
            and (issubclass(v, nn.Module) or dataclasses.is_dataclass(v))}


@functools.lru_cache(maxsize=1)
def safe_globals() -> dict[str, object]:
    """Pickled name -> object of every global a checkpoint may reference in safe mode: the classes of the modules
    in _SAFE_PACKAGES / _SAFE_MODULES, plus the data types Ultralytics' checkpoints hold (numpy dtypes and scalars,
    IterableSimpleNamespace, paths). Torch's own tensor and container types are allowed by torch itself."""
    import numpy as np
    from ultralytics.utils import IterableSimpleNamespace

    modules = [importlib.import_module(m) for m in _SAFE_MODULES]
    for name in _SAFE_PACKAGES:
        pkg = importlib.import_module(name)
        modules += [importlib.import_module(f"{name}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    allowed = {k: v for m in modules for k, v in _classes_of(m).items()}
    scalar = np.float64(0).__reduce__()[0]
    allowed.update({"numpy.dtype": np.dtype, "numpy.core.multiarray.scalar": scalar,
                    "numpy._core.multiarray.scalar": scalar,
                    "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace})
    allowed.update({f"numpy.dtypes.{k}": v for k, v in vars(np.dtypes).items() if isinstance(v, type)})
    allowed.update({f"{m}.{c}": type(Path()) for m in ("pathlib", "pathlib._local")
                    for c in ("PosixPath", "WindowsPath")})
    return allowed


def allow_checkpoint_globals(path: str | Path) -> None:
    """Refuse (CheckpointError naming why) a checkpoint safe mode does not load, without unpickling anything: one
    that references a global outside safe_globals(), or builds more than its bytes hold (pickle_scan.check_archive);
    register the globals it needs for torch.load(weights_only=True)."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise CheckpointError(f"safe loading ({SAFE_LOAD_ENV}) needs torch>=2.6; this is torch {torch.__version__}")
    allowed = safe_globals()
    try:  # the bounds first: reading the globals list decompresses the archive's pickles
        check_archive(path, allowed)
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        refused = sorted(set(needed) - set(allowed))
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise Refused(f"it references {refused[0]}{more}, which is not a class of this project, Ultralytics or "
                          f"torch.nn")
    except Refused as e:
        raise CheckpointError(f"{path} refused by safe loading: {e}; load it without {SAFE_LOAD_ENV} only if you "
                              f"trust where it came from") from e
    except (Damaged, RuntimeError, ValueError) as e:  # a damaged archive (truncated, a bad record)
        why = e if isinstance(e, Damaged) else _reason(e)
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or damaged ({why})") from e
    if needed:
        torch.serialization.add_safe_globals([(allowed[n], n) for n in needed])


@contextlib.contextmanager
def safe_loading(on: bool | None = None):
    """Within: Ultralytics' own loads (trainer, validator) in its safe mode, which also accepts this project's
    classes. `on` None: only when safe_load_enabled()."""
    if not (safe_load_enabled() if on is None else on):
        yield
        return
    from ultralytics.nn import tasks

    torch.serialization.add_safe_globals([(v, k) for k, v in safe_globals().items() if k.startswith(_PROJECT_PREFIX)])
    before, tasks.SAFE_LOAD = tasks.SAFE_LOAD, True
    try:
        yield
    finally:
        tasks.SAFE_LOAD = before


def _reason(e: BaseException) -> str:
    """One line for a failed load: what a weights_only load refused (the global it names), a damaged zip archive,
    else the loader's first line."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, pickle.UnpicklingError) and "weights_only" in str(x):
            name = re.search(r"GLOBAL ([\w.]+)", str(x))
            if name:
                return f"refused by safe loading: it references {name.group(1)}"
            why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(x))
            return "refused by safe loading" + (f": {why.group(1)}" if why else "")
        zip_error = re.search(r"PytorchStreamReader failed [^.(]*", str(x or ""))
        if zip_error:
            return f"the file is truncated or damaged ({zip_error.group(0).strip()})"
    line = next((ln for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line.replace('ERROR ❌️ ', '')}"


def printable(text) -> str:
    """`text` (from a file: a class name, a message quoting one) with control characters escaped as Python writes
    them (\\x1b, \\n), so that it prints as itself on one line and cannot move the cursor or forge a line."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_finite(model: nn.Module, source) -> None:
    """CheckpointError naming the first floating-point tensor of `model` that holds NaN or Inf."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf values (a damaged or diverged "
                                  f"checkpoint); use another one, e.g. best.pt or an earlier epoch")


def load_model(path: str | Path, safe: bool | None = None) -> tuple[nn.Module, dict]:
    """(FP32 model in eval mode, checkpoint dict) from any checkpoint this project or Ultralytics writes: a YOLO
    detection model whose float tensors are finite. `safe`: weights_only loading with the safe_globals() allowlist
    and the bounds of allow_checkpoint_globals (None: the process's mode, safe_load_enabled())."""
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    p = Path(path)
    problem = input_problem(p)
    if problem:
        raise CheckpointError(f"checkpoint {problem}: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes)")
    safe = safe_load_enabled() if safe is None else safe
    if safe:
        allow_checkpoint_globals(p)
    try:
        with safe_loading(safe):
            model, ckpt = load_checkpoint(p)
    except (AttributeError, KeyError) as e:  # a pickle, but not the dict of an Ultralytics checkpoint
        raise CheckpointError(f"{p} is not a YOLO detection model checkpoint (not the dict Ultralytics saves)") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {p}: {_reason(e)}") from e
    if not isinstance(model, DetectionModel):
        raise CheckpointError(f"{p} is not a YOLO detection model: it holds a {type(model).__name__}")
    check_finite(model, p)
    return model, ckpt


def ensure_weights(name: str, flag: str = "--weights") -> str:
    """A local path for `name`: the file itself, or, for a bare official name such as 'yolo11n.pt', Ultralytics'
    own download (into the current folder). Offline users pass a local path instead (`flag` names the option)."""
    p = Path(name)
    if p.is_file():
        return str(p)
    if special_file_kind(p):
        raise CheckpointError(f"weights {input_problem(p)}: {name}")
    if os.sep in name or "/" in name or not name.endswith(".pt"):
        raise CheckpointError(f"weights not found: {name}")
    from ultralytics.utils.downloads import attempt_download_asset

    try:
        got = attempt_download_asset(name)
    except Exception as e:  # noqa: BLE001 - offline, or no such asset
        raise CheckpointError(f"cannot download {name} ({type(e).__name__}); pass a local file with {flag} PATH "
                              f"(or WEIGHTS=PATH for run.sh)") from e
    if not Path(got).is_file():
        raise CheckpointError(f"cannot download {name}; pass a local file with {flag} PATH (or WEIGHTS=PATH)")
    return str(got)


def model_size_of(model: nn.Module) -> str | None:
    """'n', 's', 'm', 'l' or 'x' for a YOLO11 model (from its yaml's scale or file name), None if unknown."""
    y = getattr(model, "yaml", None) or {}
    if y.get("scale") in MODEL_SIZES:
        return y["scale"]
    m = re.search(rf"yolo\d+([{''.join(MODEL_SIZES)}])", str(y.get("yaml_file", "")))
    return m.group(1) if m else None


def check_model_size(model: nn.Module, expected: str, source: str) -> None:
    size = model_size_of(model)
    if size is not None and size != expected:
        raise CheckpointError(f"{source} is a yolo11{size} checkpoint, but the config asks for yolo11{expected} "
                              f"(pass --model-size {size} or another checkpoint)")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """The one writer of every file the project writes: a temporary file in the same folder, fsync, then rename.
    A crash never leaves a half-written file, and the previous version stays until the new one is complete. A
    write the machine refuses (a full disk, WRITE_FAULTS) is one OutputPathError line saying what was kept."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        refuse_write_fault(e, path, data)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # the permissions open() would give, not mkstemp's 0600
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        refuse_write_fault(e, path, data)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def refuse_write_fault(e: OSError, path: Path, data: bytes) -> None:
    """For a write of `data` to `path` that failed on a fault of the machine (WRITE_FAULTS): OutputPathError, one
    line that says so and what was kept. Other errors are left to the caller."""
    if e.errno in WRITE_FAULTS:
        kept = f"the previous {path.name} is kept" if path.is_file() else "nothing was written"
        raise OutputPathError(f"{WRITE_FAULTS[e.errno]} writing {path} ({len(data):,} bytes); {kept}") from e


class AtomicPath(type(Path())):
    """A path whose write_bytes goes through atomic_write_bytes; paths derived from it (`p / "x"`) are AtomicPaths.
    Given to Ultralytics' trainer as its weights folder and last/best paths, so its checkpoint writes are atomic."""

    def write_bytes(self, data) -> int:
        atomic_write_bytes(self, data)
        return len(data)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text (UTF-8) through atomic_write_bytes."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(obj, path: str | Path) -> str:
    """JSON (indented, non-JSON values as str) through atomic_write_bytes; returns the path."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return str(path)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save through atomic_write_bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_stock_checkpoint(model: nn.Module, path: str | Path, train_args: dict | None = None, extra: dict | None = None) -> Path:
    """Save `model` the way Ultralytics saves final weights (FP16 pickled model under 'model'), so that
    `ultralytics.YOLO(path)` loads it on any machine. `model` must hold only Ultralytics / torch classes."""
    from ultralytics import __version__

    import copy

    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    if hasattr(m, "criterion"):
        m.criterion = None
    ckpt = {"model": m, "ema": None, "train_args": dict(train_args or {}), "date": datetime.now().isoformat(),
            "version": __version__, "epoch": -1, "optimizer": None}
    ckpt.update(extra or {})
    return atomic_save(ckpt, path)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same path after following symbolic links, or one inode (a hard link)."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def special_file_kind(path: str | Path) -> str | None:
    """'a character device', 'a named pipe (FIFO)', ... for an existing path (links followed) that is neither a
    regular file nor a folder; else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((kind for test, kind in _SPECIAL_FILES if test(mode)), None)


def input_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as an input file ('not found', 'is a folder, not a file', 'is a named pipe (FIFO),
    not a regular file'), None for a regular file. Nothing is opened: a pipe would block, /dev/zero never ends."""
    kind = special_file_kind(path)
    if kind:
        return f"is {kind}, not a regular file"
    p = Path(path)
    return None if p.is_file() else "is a folder, not a file" if p.is_dir() else "not found"


def check_writable(path: str | Path, what: str = "output", folder: bool = False, inputs=()) -> None:
    """Before any work, refuse an output that cannot be written: one of the command's `inputs` (followed through
    symbolic and hard links: writing it would destroy the input), a device or pipe (the atomic writer would replace
    it), under a file, a folder where a file goes, or in a folder without write permission or on a read-only file
    system. `folder`: `path` is a folder to be created. Creates nothing."""
    for given in inputs:
        if given and same_file(path, given):
            raise OutputPathError(f"cannot write {what} {path}: it is the input {given}; choose another output path")
    p = Path(path).absolute()
    kind = special_file_kind(p)
    if kind:
        raise OutputPathError(f"cannot write {what} {path}: it is {kind}, not a {'folder' if folder else 'regular file'}")
    if not folder and p.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: it is a folder")
    if folder and p.exists() and not p.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: it is a file, not a folder")
    parent = p if folder else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        why = f"{parent} is on a read-only file system" if read_only else f"no permission to write in {parent}"
        raise OutputPathError(f"cannot write {what} {path}: {why}")
