"""Fine-tune YOLO11 with standard BitLinear (BitNet b1.58 absmean weights) in every C2PSA block: the ablation of
train_c2psa.py (fixed absmean scale instead of learned Ap/An). Same flags and trainer as train_c2psa.py.

  python train_c2psa_standard.py --config configs/stage2_c2psa_standard.yaml --model CKPT
"""

from __future__ import annotations

import argparse

from . import c2psa


def add_arguments(p: argparse.ArgumentParser) -> None:
    c2psa.add_arguments(p, "configs/stage2_c2psa_standard.yaml")


def run(a: argparse.Namespace) -> int:
    return c2psa.run(a, mode="bitlinear_standard")
