"""Progressive TTQ fine-tuning of YOLO11: train one stage (or all stages in order) of a stage config.

  python train.py --config configs/stage1_progressive.yaml --stage 1
  python train.py --stage all --weights ../shared/weights/yolo11n.pt --data /abs/coco128.yaml --imgsz 320 --epochs 10
  yolo-tq train --stage 2 --resume
"""

from __future__ import annotations

import argparse

from ..io import check_writable
from .args import add_config_args, add_resume_args, config_overrides, output_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, "configs/stage1_progressive.yaml")
    p.add_argument("--stage", default="1", help="stage number (1-based), stage name, or 'all' (default: 1)")
    p.add_argument("--start", help="start from this checkpoint instead of the previous stage's output")
    add_resume_args(p)
    p.add_argument("--post-training", metavar="OUT", type=output_path,
                   help="no training: ternarise stages 1..--stage of the config (cumulative) from --weights and save "
                        "the export to OUT (post-training ternarisation, Wp/Wn from the weights)")


ALL = "all"  # --stage all: every stage of the config, in order


def stage_numbers(cfg, key: str) -> list[int]:
    """The 1-based stage numbers --stage names: all of them for 'all', else the one stage (by number or name)."""
    from ..config import find_stage

    return list(range(1, len(cfg.stages) + 1)) if key == ALL else [find_stage(cfg, key)[0] + 1]


def post_training(cfg, a: argparse.Namespace) -> int:
    """--post-training OUT: no training; every input checked before any work."""
    from ..config import check_dataset, dataset_errors
    from ..train.preflight import stage_start
    from ..train.stages import post_training_ternary

    check_writable(a.post_training, "the post-training export", inputs=[a.start, cfg.base.weights, cfg.base.data])
    last = stage_numbers(cfg, a.stage)[-1] - 1
    start = stage_start(cfg, 0, a.start)
    if cfg.quantization.bn_reestimate_images:
        check_dataset(cfg.base.data, ("train",))
    with dataset_errors(cfg.base.data):
        out = post_training_ternary(cfg, range(last + 1), start, a.post_training)
    print(f"post-training ternary export of stages 1-{last + 1}: {out}")
    return 0


def run(a: argparse.Namespace) -> int:
    from ..config import dataset_errors, load_config
    from ..train.preflight import plan_stages, preflight
    from ..train.stages import train_stage

    cfg = load_config(a.config, config_overrides(a), a.dotlist)
    if a.post_training:
        return post_training(cfg, a)
    planned = plan_stages(cfg, stage_numbers(cfg, a.stage), a.start, a.resume, accept_changes=a.accept_changes)
    preflight(cfg, planned)
    with dataset_errors(cfg.base.data):
        for k, stage in enumerate(planned):
            result = train_stage(stage, keep_start=k == 0)
            print(f"stage {stage.number}: training checkpoint {result['best']}, ternary export {result['ternary']}")
    return 0
