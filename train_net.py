#!/usr/bin/env python
"""Train or evaluate a DCNv2 detector with detectron2's standard command line.

    python train_net.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file demo/dcnv2.yaml --num-gpus 2    # a packaged config, 2 CPU processes

The trainer, set-up and launch live in `dcnv2_plugin.engine`; an installed
package offers the same command as `dcnv2-train-net`.
"""

from dcnv2_plugin.engine import run

if __name__ == "__main__":
    run()
