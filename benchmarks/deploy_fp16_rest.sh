#!/bin/bash
# the deployable ONNX with an FP16 rest (export.py --rest fp16), validated by stock Ultralytics: is the INT8 rest what
# moves the mAP? args: NAME CKPT; sizes 320 640
export YOLO_OFFLINE=1 OMP_NUM_THREADS=1
cd "$(dirname "$0")/.."
D=${DATA:-$PWD/../shared/datasets/coco128/coco128.yaml}; O=benchmarks/work/deploy_rest; mkdir -p $O
name=$1; ckpt=$2
for s in 320 640; do
  taskset -c 0 python export.py "$ckpt" --out "$O/${name}_fp16_$s.onnx" --imgsz $s --rest fp16 --data $D --json "$O/${name}_fp16_$s.export.json" > "$O/${name}_fp16_$s.log" 2>&1
  taskset -c 0 python validate.py "$O/${name}_fp16_$s.onnx" --data $D --imgsz $s --json "$O/${name}_fp16_$s.val.json" >> "$O/${name}_fp16_$s.log" 2>&1
done
