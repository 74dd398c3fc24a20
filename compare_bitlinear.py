#!/usr/bin/env python
"""FP vs BitLinear_TTQ vs standard BitLinear in one table (yolo-tq compare). --help for flags."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("compare")
