#!/usr/bin/env python
"""Fine-tune YOLO11 with standard BitLinear (BitNet b1.58 absmean weights) in every C2PSA block: the ablation of
train_c2psa.py (fixed absmean scale instead of learned Ap/An). Same flags and trainer as train_c2psa.py.

  python train_c2psa_standard.py --config configs/stage2_c2psa_standard.yaml --model CKPT
"""

from src.cli import run_cli
from train_c2psa import main as train_c2psa_main


def main() -> int:
    return train_c2psa_main("configs/stage2_c2psa_standard.yaml", __doc__)


if __name__ == "__main__":
    run_cli(main)
