#!/usr/bin/env python
"""Validate any checkpoint with Ultralytics' validator (yolo-tq val). --help for flags."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("val")
