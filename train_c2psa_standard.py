#!/usr/bin/env python
"""Standard BitLinear in every C2PSA block, the ablation (yolo-tq c2psa-standard). --help for flags."""

from yolo_tq.cli import script

if __name__ == "__main__":
    script("c2psa-standard")
