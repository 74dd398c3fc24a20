#!/usr/bin/env bash
# YOLO11-TQ pipeline: TTQ stages 1-3, BitLinear_TTQ and standard BitLinear on C2PSA, validation, compression
# (with the packed export), the deployable ONNX of every model (validated from that file), BitLinear comparison,
# latency, and a report. Re-running continues where it stopped.
#
#   bash run.sh [quick|full] [n|s|m|l|x]          (default: quick n)
#
# Environment (all optional):
#   WEIGHTS=/path/yolo11n.pt   starting FP weights (default: yolo11<size>.pt, downloaded by Ultralytics)
#   DATA=/abs/path/data.yaml   data yaml (default: coco128.yaml for quick, coco.yaml for full)
#   RUN_DIR=runs/pipeline/...  where everything goes (default: runs/pipeline/<profile>_yolo11<size>)
#   EPOCHS, C2PSA_EPOCHS       training epochs per stage / per C2PSA step (quick: 10 / 4; full: the configs')
#   IMGSZ, BATCH               training image size and batch (quick: 320 / 16; full: the configs' unless set);
#                              IMGSZ is also the size of validation, the deployable ONNX and latency
#   DEVICE                     training, validation and latency device
#   RECONSTRUCT_STEPS          feature-reconstruction steps before each stage (default: the configs', 100)
#   LATENCY_RUNS, BACKENDS     latency benchmark runs and backends
#   SAVED_MODELS=saved_models  where the original code's result names are linked (<dir>/yolo11<size>/stage1.pt,
#                              stage1-2.pt, stage1-3.pt, stage1-3+bitlinear_ttq.pt, stage1-3+bitlinear_standard.pt)
#   ALLOW_DOWNLOAD_SCRIPT=1    let the data yaml's `download:` script run if its dataset is missing (never otherwise)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PROFILE=${1:-quick}
SIZE=${2:-n}
case "$PROFILE" in quick|full) ;; *) echo "usage: bash run.sh [quick|full] [n|s|m|l|x]" >&2; exit 2 ;; esac
case "$SIZE" in n|s|m|l|x) ;; *) echo "usage: bash run.sh [quick|full] [n|s|m|l|x]" >&2; exit 2 ;; esac

WEIGHTS=${WEIGHTS:-yolo11${SIZE}.pt}
RUN_DIR=${RUN_DIR:-runs/pipeline/${PROFILE}_yolo11${SIZE}}
CK="$RUN_DIR/checkpoints"
OUT="$CK/yolo11${SIZE}"
writable_folder() {  # writable_folder NAME DIR: one error line and exit 2, before any step, unless DIR can be written
  local d=$2
  [ -e "$d" ] && [ ! -d "$d" ] && { echo "error: $1 $2 is a file, not a folder" >&2; exit 2; }
  while [ ! -e "$d" ]; do d=$(dirname "$d"); done  # the nearest folder that exists (".", "/" at the latest)
  [ -d "$d" ] || { echo "error: cannot write $1 $2: $d is a file, not a folder" >&2; exit 2; }
  [ -w "$d" ] && [ -x "$d" ] ||
    { echo "error: cannot write $1 $2: no permission to write in $d (or a read-only file system)" >&2; exit 2; }
}
writable_folder RUN_DIR "$RUN_DIR"
writable_folder SAVED_MODELS "${SAVED_MODELS:-saved_models}"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/.done" "$RUN_DIR/results"
export YOLO_OFFLINE=${YOLO_OFFLINE:-}
[ -n "${ALLOW_DOWNLOAD_SCRIPT:-}" ] && export YOLO_TQ_ALLOW_DOWNLOAD_SCRIPT=1

TRAIN=(--model-size "$SIZE" --checkpoint-dir "$CK")
[ -n "${RECONSTRUCT_STEPS:-}" ] && TRAIN+=(--set "distill.reconstruct_steps=$RECONSTRUCT_STEPS")
if [ "$PROFILE" = quick ]; then
  DATA=${DATA:-coco128.yaml}
  IMGSZ=${IMGSZ:-320}; BATCH=${BATCH:-16}; EPOCHS=${EPOCHS:-10}; C2PSA_EPOCHS=${C2PSA_EPOCHS:-4}
  TRAIN+=(--imgsz "$IMGSZ" --batch "$BATCH" --epochs "$EPOCHS" --set "train.ultralytics.nbs=$BATCH" --set train.val=false)
  C2PSA_TRAIN=("${TRAIN[@]}" --epochs "$C2PSA_EPOCHS")
  LATENCY_RUNS=${LATENCY_RUNS:-30}
else
  DATA=${DATA:-coco.yaml}
  [ -n "${IMGSZ:-}" ] && TRAIN+=(--imgsz "$IMGSZ")  # else the configs' own (640)
  [ -n "${BATCH:-}" ] && TRAIN+=(--batch "$BATCH")  # else the configs' own
  IMGSZ=${IMGSZ:-640}; BATCH=${BATCH:-16}
  [ -n "${EPOCHS:-}" ] && TRAIN+=(--epochs "$EPOCHS")
  C2PSA_TRAIN=("${TRAIN[@]}")
  [ -n "${C2PSA_EPOCHS:-}" ] && C2PSA_TRAIN+=(--epochs "$C2PSA_EPOCHS")
  LATENCY_RUNS=${LATENCY_RUNS:-100}
fi
[ -n "${DEVICE:-}" ] && TRAIN+=(--device "$DEVICE") && C2PSA_TRAIN+=(--device "$DEVICE")
VAL=(--data "$DATA" --imgsz "$IMGSZ" --batch 16)
[ -n "${DEVICE:-}" ] && VAL+=(--device "$DEVICE")

step() {  # step NAME COMMAND...: run once; a finished step (marker file) is skipped on re-runs
  local name=$1; shift
  if [ -f "$RUN_DIR/.done/$name" ]; then echo "== $name: done earlier, skipped"; return 0; fi
  echo "== $name: $*"
  local t0=$SECONDS
  if ! "$@" 2>&1 | tee "$RUN_DIR/logs/$name.log"; then  # pipefail: the step's status; the log is complete after
    echo "run.sh: step '$name' failed; see $RUN_DIR/logs/$name.log. Fix the cause and re-run the same command to continue." >&2
    exit 1
  fi
  echo "$((SECONDS - t0))" > "$RUN_DIR/.done/$name"
}

step fetch_weights python -m yolo_tq fetch "$WEIGHTS"
WEIGHTS_PATH=$(tail -n 1 "$RUN_DIR/logs/fetch_weights.log")

for n in 1 2 3; do
  step "stage$n" python train.py --config configs/stage1_progressive.yaml --stage "$n" --weights "$WEIGHTS_PATH" --data "$DATA" "${TRAIN[@]}"
done
STAGE3="$OUT/stage3/weights/best.pt"
step c2psa_ttq python train_c2psa.py --config configs/stage2_c2psa.yaml --model "$STAGE3" --weights "$WEIGHTS_PATH" --data "$DATA" "${C2PSA_TRAIN[@]}"
step c2psa_standard python train_c2psa_standard.py --config configs/stage2_c2psa_standard.yaml --model "$STAGE3" --weights "$WEIGHTS_PATH" --data "$DATA" "${C2PSA_TRAIN[@]}"

declare -A MODEL=([stage1]="$OUT/stage1/ternary.pt" [stage2]="$OUT/stage2/ternary.pt" [stage3]="$OUT/stage3/ternary.pt"
                  [c2psa_ttq]="$OUT/c2psa_bitlinear_ttq/ternary.pt" [c2psa_standard]="$OUT/c2psa_bitlinear_standard/ternary.pt")
STEPS=(stage1 stage2 stage3 c2psa_ttq c2psa_standard)
SAVED="${SAVED_MODELS:-saved_models}/yolo11${SIZE}"  # the original's result names, linked to the stage outputs
mkdir -p "$SAVED"
for pair in stage1:stage1 stage1-2:stage2 stage1-3:stage3 stage1-3+bitlinear_ttq:c2psa_ttq \
            stage1-3+bitlinear_standard:c2psa_standard; do
  ln -sfn "$(cd "$(dirname "${MODEL[${pair#*:}]}")" && pwd)/ternary.pt" "$SAVED/${pair%%:*}.pt"
done
step val_fp python validate.py "$WEIGHTS_PATH" "${VAL[@]}" --json "$RUN_DIR/results/val_fp.json"
for s in "${STEPS[@]}"; do
  step "val_$s" python validate.py "${MODEL[$s]}" "${VAL[@]}" --json "$RUN_DIR/results/val_$s.json"
  step "compression_$s" python compression_calculation.py --baseline "$WEIGHTS_PATH" --quantized "${MODEL[$s]}" \
    --pack "$RUN_DIR/results/$s.tq.safetensors" --json "$RUN_DIR/results/compression_$s.json"
done
MODEL[fp]="$WEIGHTS_PATH"
for s in fp "${STEPS[@]}"; do  # the deployable ONNX of every model, validated by stock Ultralytics from that file
  step "deploy_$s" python export.py "${MODEL[$s]}" --out "$RUN_DIR/results/$s.onnx" --imgsz "$IMGSZ" --data "$DATA" \
    --json "$RUN_DIR/results/deploy_$s.json"
  step "deploy_val_$s" python validate.py "$RUN_DIR/results/$s.onnx" "${VAL[@]}" --json "$RUN_DIR/results/deploy_val_$s.json"
done
step compare_bitlinear python compare_bitlinear.py --baseline "${MODEL[stage3]}" --ttq "${MODEL[c2psa_ttq]}" \
  --standard "${MODEL[c2psa_standard]}" "${VAL[@]}" --json "$RUN_DIR/results/compare_bitlinear.json" --csv "$RUN_DIR/results/compare_bitlinear.csv"
LAT=(--baseline "$WEIGHTS_PATH" --quantized "${MODEL[c2psa_ttq]}" --export-int8 --imgsz "$IMGSZ" --batch 1 --num-runs "$LATENCY_RUNS" --data "$DATA" --json "$RUN_DIR/results/latency.json")
[ -n "${BACKENDS:-}" ] && LAT+=(--backends $BACKENDS)
[ -n "${DEVICE:-}" ] && LAT+=(--device "$DEVICE")
step latency python latency_benchmark.py "${LAT[@]}"
step int8_reference python -m yolo_tq int8-reference --weights "$WEIGHTS_PATH" --data "$DATA" --imgsz "$IMGSZ" \
  --workdir "$RUN_DIR/int8_reference" --json "$RUN_DIR/results/int8_reference.json"
rm -f "$RUN_DIR/.done/report"  # the report is always rebuilt from whatever is there
step report python -m yolo_tq report "$RUN_DIR" --profile "$PROFILE" --size "$SIZE"
echo "run.sh: finished; report in $RUN_DIR/summary.md"
