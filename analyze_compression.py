#!/usr/bin/env python
"""The original README's name for compression_calculation.py (yolo-tq size): the same flags, the same report."""
from yolo_tq.cli import script

if __name__ == "__main__":
    script("size")
