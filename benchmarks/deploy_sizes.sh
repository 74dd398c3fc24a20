#!/bin/bash
# bytes of the deployable ONNX as the current export writes it (short names), every model at 640 and 320
export YOLO_OFFLINE=1 OMP_NUM_THREADS=1
cd "$(dirname "$0")/.."
D=${DATA:-$PWD/../shared/datasets/coco128/coco128.yaml}; O=benchmarks/work/deploy_short; mkdir -p $O
C=benchmarks/work/chain640_s0/checkpoints/yolo11n; B=benchmarks/work/c2psa_chain640_s0/s3_ttq/checkpoints/yolo11n/c2psa_bitlinear_ttq/ternary.pt
for pair in "fp=/work/shared/weights/yolo11n.pt" "stage1=$C/stage1/ternary.pt" "stage2=$C/stage2/ternary.pt" "stage3=$C/stage3/ternary.pt" "c2psa=$B"; do
  n=${pair%%=*}; ck=${pair#*=}
  for s in 640 320; do
    taskset -c 1 python export.py "$ck" --out $O/${n}_$s.onnx --imgsz $s --data $D --json $O/${n}_$s.json > $O/${n}_$s.log 2>&1
  done
done
taskset -c 1 python validate.py $O/c2psa_640.onnx --data $D --imgsz 640 --json $O/val_c2psa_640.json > $O/val.log 2>&1
