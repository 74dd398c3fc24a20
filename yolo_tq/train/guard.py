"""Training runs that survive people and signals.

One run per stage folder (`<stage folder>/.lock` holds the PID; a lock of a dead process is taken over), one line
on SIGINT / SIGTERM saying what was saved and the command that resumes (exit status 130 / 143), and nothing left
behind by a run that fails before it saved a checkpoint in a folder it created.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from ..io import CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: the PID in the lock file is the only guard
    fcntl = None

LOCK_NAME = ".lock"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StageLockedError(CheckpointError):
    """Another live process is training into the same stage folder."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during a run (a BaseException, so that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _start_time(pid: int) -> str | None:
    """When process `pid` started (Linux /proc), to tell it from a later process that got the same PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return start is None or _start_time(pid) in (None, start)


class StageLock:
    """`<folder>/.lock` holding '<PID> <start time>' while a run trains into the folder (creates the folder).
    Where fcntl exists the file is also flock-ed, so two processes never both take over a stale lock."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def holder(self) -> tuple[int, str | None] | None:
        try:
            fields = self.path.read_text().split()
            return int(fields[0]), (fields[1] if len(fields) > 1 else None)
        except (OSError, ValueError, IndexError):
            return None

    def _refuse(self, holder) -> None:
        raise StageLockedError(f"{self.path.parent} is in use by another training run (PID {holder[0]}, "
                               f"{self.path}); wait for it to finish, or train into another --checkpoint-dir")

    def acquire(self) -> "StageLock":
        while self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = None
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        self._refuse(self.holder() or ("unknown",))
                    if not self._ours(fd):
                        continue  # released (unlinked) while we opened it: lock the new file
                holder = self.holder()
                if holder is not None and holder[0] != os.getpid() and _alive(*holder):
                    self._refuse(holder)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {_start_time(os.getpid()) or ''}".strip().encode() + b"\n")
                self.fd, fd = fd, None
            except FileNotFoundError:
                continue  # the folder or file went away meanwhile: try again
            finally:
                if fd is not None:
                    os.close(fd)
        return self

    def _ours(self, fd: int) -> bool:
        """Whether the lock path still names the file open as `fd`."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file (unless another run has made a new one there meanwhile) and unlock."""
        if self.fd is not None:
            if self._ours(self.fd):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def raise_on_signals():
    """Within: SIGINT / SIGTERM raise Interrupted in the main thread (a second one ends the process at once). Yields
    the list of signals received: one whose exception was swallowed (it landed in a weakref callback or a __del__,
    where Python only prints "Exception ignored") is raised again by raise_received, and at the end of the block."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield received
        raise_received(received)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def raise_received(received: list[int]) -> None:
    """Raise Interrupted for a signal raise_on_signals received, if any (its first raise may have been swallowed)."""
    if received:
        raise Interrupted(received[0])


def command_line(stage_number: int | None = None, resume: bool = False, start: str | None = None,
                 keep_start: bool = False, start_flag: str = "--start") -> str:
    """This process's command line as a user types it, for stage `stage_number`, with --resume or starting from
    `start` (given with `start_flag`, the command's own flag); that flag is dropped unless `keep_start`."""
    argv = sys.argv
    program = [Path(argv[0]).name] if not argv[0].endswith(".py") else (
        sys.orig_argv[:sys.orig_argv.index(argv[0]) + 1] if argv[0] in getattr(sys, "orig_argv", ()) else
        ["python", argv[0]])
    drop = {"--resume": 0, **({} if keep_start and not (resume or start) else {start_flag: 1})}  # flag -> values
    out, args = [], iter(argv[1:])
    for a in args:
        flag, _, value = a.partition("=")
        if flag in drop:
            if drop[flag] and not value:
                next(args, None)
        elif flag == "--stage" and stage_number is not None:
            out += ["--stage", str(stage_number)]
            if not value:
                next(args, None)
        else:
            out.append(a)
    out += ["--resume"] if resume else [start_flag, str(start)] if start else []
    return shlex.join(program + out)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None: `folder` exists)."""
    missing = None
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing = p
    return missing


class StageRun:
    """One training run into a stage folder: holds its lock, turns SIGINT / SIGTERM into one line and exit status
    128 + signal, and removes the folder when the run created it and ends (error or signal) before any checkpoint.
    Set `resumed` to (epoch, epochs) of the last.pt a resumed run starts from."""

    def __init__(self, folder: str | Path, stage_number: int, keep_start: bool = False, start_flag: str = "--start"):
        self.folder = Path(folder).absolute()
        self.created = _first_missing(self.folder)
        self.stage_number, self.keep_start, self.start_flag = stage_number, keep_start, start_flag
        self.resumed: tuple[int, int | None] | None = None  # (epoch, epochs) of the last.pt a resume starts from
        self.started = time.time()
        self.lock = StageLock(self.folder)
        self.signals: list[int] = []  # SIGINT / SIGTERM received during guard()

    def check_signals(self, *_) -> None:
        """A trainer callback: end the run for a signal whose first exception something swallowed."""
        raise_received(self.signals)

    def last_saved(self) -> tuple[int, int | None] | None:
        """(epochs done, epochs) of the last.pt this run saved (also from a DDP worker), else of the one it resumes."""
        from ..io import load_model

        last = self.folder / "weights" / "last.pt"
        if not (last.is_file() and last.stat().st_mtime >= self.started):
            return self.resumed
        try:
            ckpt = load_model(last)[1]
        except CheckpointError:
            return self.resumed
        epochs = (ckpt.get("train_args") or {}).get("epochs")
        return (epochs if ckpt.get("epoch", -1) < 0 else ckpt["epoch"] + 1), epochs  # epoch -1: the final strip

    def remove_if_failed_start(self) -> None:
        """Remove the folder (and the empty folders above it) this run created, unless it holds a checkpoint."""
        if self.created is None or any((self.folder / "weights").glob("*.pt")):
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        p = self.folder.parent
        while p == self.created or self.created in p.parents:
            with contextlib.suppress(OSError):
                p.rmdir()
            p = p.parent

    def interrupted_line(self, signum: int) -> str:
        name, last, saved = signal.Signals(signum).name, self.folder / "weights" / "last.pt", self.last_saved()
        if not saved or not saved[0]:
            return (f"interrupted by {name} before the first epoch ended: nothing saved; start again with: "
                    f"{command_line(self.stage_number, keep_start=self.keep_start, start_flag=self.start_flag)}")
        done, epochs = saved
        of = f"/{epochs}" if epochs else ""
        if epochs and done >= epochs:
            return (f"interrupted by {name} after the last epoch: {last} holds epoch {done}{of}; the final "
                    f"validation and the ternary export did not run")
        return (f"interrupted by {name}: saved {last} (epoch {done}{of}); resume with: "
                f"{command_line(self.stage_number, resume=True, start_flag=self.start_flag)}")

    def remove_temporaries(self) -> list[Path]:
        """Remove the temporary files an interrupted save left in the folder (io.atomic_write_bytes' `.<name>.*.tmp`,
        trainer.atomic_strips' `.<name>.strip.tmp`), naming them in a line. Only under the folder's lock."""
        left = sorted(p for d in (self.folder, self.folder / "weights") for p in d.glob(".*.tmp") if p.is_file())
        for p in left:
            p.unlink(missing_ok=True)
        if left:
            print(f"removed {len(left)} temporary file(s) an interrupted save left: {', '.join(map(str, left))}",
                  file=sys.stderr, flush=True)
        return left

    @contextlib.contextmanager
    def guard(self):
        self.lock.acquire()
        self.remove_temporaries()
        try:
            with raise_on_signals() as self.signals:
                yield self
        except Interrupted as e:
            print(self.interrupted_line(e.signum), file=sys.stderr, flush=True)
            self.remove_if_failed_start()
            raise SystemExit(128 + e.signum) from None
        except BaseException:
            self.remove_if_failed_start()
            raise
        finally:
            self.lock.release()
