#!/usr/bin/env python
"""Model size of a ternary checkpoint against its FP baseline, and the packed ternary file (yolo-tq size)."""
from yolo_tq.cli import script

if __name__ == "__main__":
    script("size")
