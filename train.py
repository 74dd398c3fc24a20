#!/usr/bin/env python
"""Progressive TTQ fine-tuning of YOLO11, one stage or all (yolo-tq train). --help for flags."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("train")
