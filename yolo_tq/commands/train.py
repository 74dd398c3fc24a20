"""Progressive TTQ fine-tuning of YOLO11: train one stage (or all stages in order) of a stage config.

  python train.py --config configs/stage1_progressive.yaml --stage 1
  python train.py --stage all --weights ../shared/weights/yolo11n.pt --data /abs/coco128.yaml --imgsz 320 --epochs 10
  yolo-tq train --stage 2 --resume
"""

from __future__ import annotations

import argparse

from ..cli import add_config_args, check_training, check_writable, config_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, "configs/stage1_progressive.yaml")
    p.add_argument("--stage", default="1", help="stage number (1-based), stage name, or 'all' (default: 1)")
    p.add_argument("--start", help="start from this checkpoint instead of the previous stage's output")
    p.add_argument("--resume", action="store_true", help="resume the stage from its last.pt")
    p.add_argument("--post-training", metavar="OUT",
                   help="no training: ternarise stages 1..--stage of the config (cumulative) from --weights and save "
                        "the export to OUT (post-training ternarisation, Wp/Wn from the weights)")


def post_training(cfg, a: argparse.Namespace) -> int:
    """--post-training OUT: no training; every input checked before any work."""
    from ..config import check_dataset, dataset_errors, find_stage
    from ..train.stages import post_training_ternary, resolve_start

    check_writable(a.post_training, "the post-training export")
    last = len(cfg.stages) - 1 if a.stage == "all" else find_stage(cfg, a.stage)[0]
    start = a.start or resolve_start(cfg, 0, None)
    if cfg.quantization.bn_reestimate_images:
        check_dataset(cfg.base.data, ("train",))
    with dataset_errors(cfg.base.data):
        out = post_training_ternary(cfg, range(last + 1), start, a.post_training)
    print(f"post-training ternary export of stages 1-{last + 1}: {out}")
    return 0


def run(a: argparse.Namespace) -> int:
    from ..config import dataset_errors, find_stage, load_config
    from ..train.stages import train_stage

    cfg = load_config(a.config, config_overrides(a), a.dotlist)
    if a.post_training:
        return post_training(cfg, a)
    keys = [str(i + 1) for i in range(len(cfg.stages))] if a.stage == "all" else [a.stage]
    start = check_training(cfg, [find_stage(cfg, k)[0] for k in keys], a.start, a.resume)
    with dataset_errors(cfg.base.data):
        for n, key in enumerate(keys):
            result = train_stage(cfg, key, start=start if n == 0 else None, resume=a.resume and n == 0)
            print(f"stage {key}: training checkpoint {result['best']}, ternary export {result['ternary']}")
    return 0
