#!/usr/bin/env bash
# GPU part of the latency benchmark (issue 5), as one short script for a lent NVIDIA machine (H100 / H200).
#
#   bash benchmarks/latency_gpu.sh BASELINE.pt QUANTIZED.pt [DATA.yaml]
#
# Runs latency_benchmark.py with --device 0: PyTorch CUDA FP32 (TF32 off) and FP16, ONNX Runtime CUDA (only with
# onnxruntime-gpu), TensorRT FP16 and INT8 (only with tensorrt; INT8 also needs DATA for calibration). Targets that
# cannot run print one skip line each. Batch 1 (latency) for all targets, then batch 16 (throughput) for PyTorch.
# Writes latency_gpu_b1.json and latency_gpu_b16.json to $OUT if set, else benchmarks/results/.
# Set-up, offline: wheels the machine lacks (e.g. ultralytics, onnxslim, tensorrt, and this package, built with
# `pip wheel --no-deps -w .latgpu .`) can be carried in .latgpu/; they are installed with pip --no-index --no-deps.
# Without a carried wheel this package is installed from the checkout (needs setuptools >= 68 on the machine).
# Budget: without TensorRT about 2 minutes after the machine starts; each TensorRT engine build adds about 1-2 min
# (four builds: FP16 and INT8 of both models) - not measured here, no TensorRT was available.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/latency_gpu.sh BASELINE.pt QUANTIZED.pt [DATA.yaml]" >&2
  exit 2
fi
BASE=$1
QUANT=$2
DATA=${3:-}
export YOLO_OFFLINE=1 YOLO_VERBOSE=False PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)
shopt -s nullglob
WHEELS=(.latgpu/*.whl)
if [ ${#WHEELS[@]} -gt 0 ]; then
  "$PY" -m pip install --quiet --no-index --no-deps "${WHEELS[@]}"
fi
if ! (cd / && "$PY" -c "import yolo_tq") 2>/dev/null; then  # from / : the checkout itself does not count
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
fi
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
WORK=$(mktemp -d /tmp/latency_gpu.XXXXXX)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, ultralytics; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ultralytics', ultralytics.__version__)"
DATA_ARGS=()
if [ -n "$DATA" ]; then DATA_ARGS=(--data "$DATA"); fi

"$PY" latency_benchmark.py --baseline "$BASE" --quantized "$QUANT" --device 0 --export-fp16 --export-int8 \
  ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --imgsz 640 --batch 1 --num-runs 300 --warmup 50 --workdir "$WORK/b1" \
  --json "$DEST/latency_gpu_b1.json"

"$PY" latency_benchmark.py --baseline "$BASE" --quantized "$QUANT" --device 0 --export-fp16 --backends torch \
  --imgsz 640 --batch 16 --num-runs 100 --warmup 20 --workdir "$WORK/b16" --json "$DEST/latency_gpu_b16.json"
