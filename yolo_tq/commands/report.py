"""The run.sh report of a pipeline run folder: summary.json, summary.md and the plots (map_vs_size.png, stages.png),
from the JSON files its steps wrote. Every figure comes from a file; what a step did not measure is said, with the
reason, not filled in.

  yolo-tq report runs/pipeline/quick_yolo11n --profile quick --size n
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the pipeline run folder (run.sh's RUN_DIR)")
    p.add_argument("--profile", default="quick", help="run.sh profile the run used, for the headings (default quick)")
    p.add_argument("--size", default="n", help="YOLO11 size the run trained, for the headings (default n)")


def run(a: argparse.Namespace) -> int:
    from ..report import write_report

    run_dir = Path(a.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(2, "pipeline run folder not found", str(run_dir))
    for path in write_report(run_dir, a.profile, a.size)[2:]:
        print(f"plot: {path}")
    print((run_dir / "summary.md").read_text())
    return 0
