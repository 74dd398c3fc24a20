"""The measured reference of the pipeline report: Ultralytics' own INT8 export of the FP model (OpenVINO, weights and
activations quantized by NNCF, calibrated on the train split of --data), its size on disk and its mAP from
Ultralytics' validator, with the FP model validated the same way (batch 1, rect=False). Without the deploy extras
(OpenVINO + NNCF) nothing is exported and the JSON says why.

  yolo-tq int8-reference --weights yolo11n.pt --data coco128.yaml --imgsz 320 \\
      --workdir RUN_DIR/int8_reference --json RUN_DIR/results/int8_reference.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..io import check_writable
from .args import data_path, imgsz_arg, input_file, output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, type=input_file, help="the FP checkpoint (.pt)")
    p.add_argument("--data", required=True, type=data_path,
                   help="data yaml: calibration (train split) and validation (val split)")
    p.add_argument("--imgsz", type=imgsz_arg, default=640, help="export and validation size (default 640)")
    p.add_argument("--workdir", required=True, type=output_path, help="where the export and its validation go")
    p.add_argument("--json", required=True, type=output_path, help="the record the pipeline report reads")


def run(a: argparse.Namespace) -> int:
    from ..deploy.reference import int8_reference
    from ..io import write_json

    check_writable(a.json, "the reference JSON", inputs=[a.weights, a.data])
    check_writable(a.workdir, "the work folder", folder=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    print(f"JSON: {write_json(int8_reference(a.weights, a.data, a.imgsz, Path(a.workdir)), a.json)}")
    return 0
