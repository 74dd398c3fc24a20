"""Memory and size figures: peak resident memory of this process, GPU memory, file sizes on disk."""

from __future__ import annotations

import os
import resource
import zlib
from pathlib import Path

MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss(tolerance_kb: int = 4096) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux: clear_refs 5).
    Returns True only when the mark then reads within `tolerance_kb` of the current RSS: some kernels (sandboxes)
    accept the write and ignore it. On False, peak_rss_mb() is the peak since process start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _peak_follows_rss(_status_kb("VmHWM"), _status_kb("VmRSS"), tolerance_kb)


def _peak_follows_rss(peak_kb: int | None, rss_kb: int | None, tolerance_kb: int) -> bool:
    """Whether a just-reset peak mark is the current RSS (a mark left at an earlier, larger peak means no reset)."""
    return peak_kb is not None and rss_kb is not None and peak_kb <= rss_kb + tolerance_kb


def current_rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; getrusage's ru_maxrss where /proc is absent)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def file_size_mb(path: str | Path) -> float:
    """Size on disk of a model file, or of all files of a model folder (OpenVINO's .xml + .bin + metadata)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    return sum(os.path.getsize(f) for f in _files(p.resolve())) / MB


def compressed_size_mb(path: str | Path, level: int = 6) -> float:
    """Size of the model's files after zlib compression: shows what a ternary model's low-entropy weights would save
    in storage or download, which dense formats (and their runtime memory) do not."""
    p = Path(path).resolve()
    total = 0
    for f in _files(p):
        c = zlib.compressobj(level)
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(c.compress(chunk))
        total += len(c.flush())
    return total / MB
