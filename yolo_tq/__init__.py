"""YOLO11-TQ: ternary quantization (TTQ, BitLinear) for Ultralytics YOLO11 detectors."""
