"""A local path of a checkpoint: a path is checked and printed; an official Ultralytics name (yolo11n.pt) is
downloaded first when it is missing, as Ultralytics does. run.sh's first step.

  yolo-tq fetch yolo11n.pt
  yolo-tq fetch ../shared/weights/yolo11n.pt
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="a checkpoint path, or an official Ultralytics weights name")


def run(a: argparse.Namespace) -> int:
    from ..io import ensure_weights

    print(ensure_weights(a.name))
    return 0
