#!/usr/bin/env python
"""Fine-tune YOLO11 with BitLinear_TTQ layers in every C2PSA block (one stage, through the project's trainer).

--model is the start checkpoint: a plain YOLO11 checkpoint (C2PSA alone) or any train.py stage output; starting
from the stage-3 output gives the full "stages 1-3 + BitLinear_TTQ" model (its TTQ layers stay ternary).

  python train_c2psa.py --config configs/stage2_c2psa.yaml --model checkpoints/yolo11n/stage3/weights/best.pt
  python train_c2psa.py --config configs/stage2_c2psa.yaml --resume
"""

import argparse

from src.cli import add_config_args, config_overrides, run_cli


def main(default_config: str = "configs/stage2_c2psa.yaml", description: str = __doc__) -> int:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_config)
    p.add_argument("--model", help="start checkpoint (default: the config's base.weights)")
    p.add_argument("--resume", action="store_true", help="resume the stage from its last.pt")
    a = p.parse_args()

    from src.config import ConfigError, load_config
    from src.training.stages import train_stage

    cfg = load_config(a.config, config_overrides(a), a.dotlist)
    if len(cfg.stages) != 1 or not cfg.stages[0].c2psa:
        raise ConfigError(f"{a.config}: expected one stage with `c2psa: bitlinear_ttq|bitlinear_standard`")
    result = train_stage(cfg, 1, start=a.model, resume=a.resume)
    print(f"{cfg.stages[0].c2psa}: training checkpoint {result['best']}, ternary export {result['ternary']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
