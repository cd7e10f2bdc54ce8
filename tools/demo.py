#!/usr/bin/env python
"""Train, evaluate and compare the DCNv2 ablation's models on a CPU, in minutes.

Trains small Mask R-CNNs (configs/demo/) on the embedded shapes dataset with
train_net.py, as the paper does on COCO: first the regular detector (the
shared start, standing in for pretrained weights; trained once and reused),
then from it regular, STN, DCNv1, DCNv2 and DCNv2 with feature mimicking,
two side by side on a 2-core machine. Evaluates each with COCOEvaluator and
writes into --output: results.md and
results.json (AP, AP50, AP75 of boxes and masks, parameters, training time
per iteration, inference time per image), losses.png, and pictures/ (the
DCNv2 model's sampling locations, drawn by tools/visualize.py).

    python tools/demo.py --output output/demo
    python tools/demo.py --output output/demo --models regular dcnv2 --seed 0 1
    python tools/demo.py --output /tmp/demo --quick    # a smoke test of the pipeline
"""

import sys
from pathlib import Path

# The demo lives beside the package, in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcnv2_demo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
