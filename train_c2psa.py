#!/usr/bin/env python
"""BitLinear_TTQ in every C2PSA block of YOLO11 (yolo-tq c2psa). --help for flags."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("c2psa")
