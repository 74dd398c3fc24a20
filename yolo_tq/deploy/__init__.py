"""Deployment benchmark: export to ONNX Runtime / OpenVINO / TensorRT, check the exports agree with PyTorch, time
them with the right clock, measure memory and file size, and compare a quantized model with its baseline."""
