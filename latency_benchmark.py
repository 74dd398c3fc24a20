#!/usr/bin/env python
"""Latency of a baseline vs a quantized checkpoint: exports, agreement, latency, memory (yolo-tq latency)."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("latency")
