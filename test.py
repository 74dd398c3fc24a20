#!/usr/bin/env python
"""List which layers of a checkpoint are ternary (yolo-tq layers). --help for flags."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("layers")
