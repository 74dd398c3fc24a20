#!/usr/bin/env python
"""Export a model to the deployable low-bit ONNX that onnxruntime and stock Ultralytics run (yolo-tq export)."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("export")
