"""Helpers shared by the benchmark scripts: repo paths, ../shared discovery, provenance, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "yolo11n.pt"
SHARED_DATA = SHARED / "datasets" / "coco128" / "coco128.yaml"

os.environ.setdefault("YOLO_OFFLINE", "1")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def require(path: Path | str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        sys.exit(f"error: {what} not found at {p} (pass it with a flag; ../shared provides it in this workplace)")
    return p.resolve()


def provenance() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    import torch
    import ultralytics

    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ultralytics": ultralytics.__version__}


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    widths = [max(len(h), *(len(format(r.get(k, ""), f) if r.get(k) is not None else "-") for r in rows))
              for k, h, f in columns]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        cells = [(format(r[k], f) if r.get(k) is not None else "-") for k, _, f in columns]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
