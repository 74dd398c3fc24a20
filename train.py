#!/usr/bin/env python
"""Progressive TTQ fine-tuning of YOLO11: train one stage (or all stages in order) of a stage config.

  python train.py --config configs/stage1_progressive.yaml --stage 1
  python train.py --stage all --weights ../shared/weights/yolo11n.pt --data /abs/coco128.yaml --imgsz 320 --epochs 10
"""

import argparse

from src.cli import add_config_args, config_overrides, run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "configs/stage1_progressive.yaml")
    p.add_argument("--stage", default="1", help="stage number (1-based), stage name, or 'all' (default: 1)")
    p.add_argument("--start", help="start from this checkpoint instead of the previous stage's output")
    p.add_argument("--resume", action="store_true", help="resume the stage from its last.pt")
    a = p.parse_args()

    from src.config import load_config
    from src.training.stages import train_stage

    cfg = load_config(a.config, config_overrides(a), a.dotlist)
    keys = [str(i + 1) for i in range(len(cfg.stages))] if a.stage == "all" else [a.stage]
    for n, key in enumerate(keys):
        result = train_stage(cfg, key, start=a.start if n == 0 else None, resume=a.resume and n == 0)
        print(f"stage {key}: training checkpoint {result['best']}, ternary export {result['ternary']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
