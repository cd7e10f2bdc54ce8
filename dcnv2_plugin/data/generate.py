"""Writes the shapes dataset as COCO-format JSON plus PNG images, once per parameter set.

Each split lives in its own folder under the dataset root, named by the hash
of everything that determines it, so a second call with the same parameters
reuses it and changed parameters get a fresh folder. Image i of a split is
drawn from a generator seeded with (split seed, i): the content does not
depend on generation order, and two runs write byte-identical files.

Command line: python -m dcnv2_plugin.data.generate --output DIR
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util
from tqdm import tqdm

from .params import DEFAULT_PARAMS, DEFAULT_SPLITS, ShapesParams, SplitSpec, describe, spec_fingerprint
from .scene import Instance, render_scene

logger = logging.getLogger(__name__)

DATASETS_ENV = "DCNV2_DATASETS"
JSON_NAME = "annotations.json"
IMAGES_NAME = "images"


def default_root() -> Path:
    """$DCNV2_DATASETS, else ~/.cache/dcnv2_plugin/datasets."""
    configured = os.environ.get(DATASETS_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "dcnv2_plugin" / "datasets"


@dataclass(frozen=True)
class SplitFiles:
    json_file: Path
    image_root: Path

    @property
    def directory(self) -> Path:
        return self.json_file.parent


def split_files(root: Path, split_name: str, params: ShapesParams, split: SplitSpec) -> SplitFiles:
    """Where a split is (or will be) stored; generates nothing."""
    directory = Path(root) / f"shapes-{split_name}-{spec_fingerprint(params, split)}"
    return SplitFiles(directory / JSON_NAME, directory / IMAGES_NAME)


def _encode_mask(mask: np.ndarray) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotation(instance: Instance) -> Dict:
    ys, xs = np.nonzero(instance.mask)
    x0, y0 = int(xs.min()), int(ys.min())
    warp = instance.warp
    return {
        "category_id": instance.category + 1,
        # Tight box of the visible pixels, in COCO's [x, y, width, height]
        # with pixel edges as coordinates (a 1-pixel object is 1 wide).
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "area": int(instance.mask.sum()),
        "segmentation": _encode_mask(instance.mask),
        "iscrowd": 0,
        # How this instance was drawn, for slicing results by deformation.
        "attributes": {
            "size": round(warp.size, 3),
            "aspect": round(warp.aspect, 4),
            "rotation_deg": round(warp.rotation_deg, 2),
            "shear": round(warp.shear, 4),
            "perspective": [round(float(p), 4) for p in warp.perspective],
            "visible_fraction": round(instance.visible_fraction, 4),
        },
    }


def draw_image(params: ShapesParams, split: SplitSpec, index: int) -> Tuple[np.ndarray, List[Dict]]:
    """Image `index` of a split (RGB uint8) and its annotations, without ids."""
    rng = np.random.default_rng([split.seed, index])
    image, instances = render_scene(rng, params)
    return image, [_annotation(instance) for instance in instances]


def _write_split(directory: Path, split_name: str, params: ShapesParams, split: SplitSpec) -> None:
    (directory / IMAGES_NAME).mkdir(parents=True)
    images, annotations = [], []
    for index in tqdm(range(split.num_images), desc=f"generating shapes {split_name}", unit="img"):
        image, image_annotations = draw_image(params, split, index)
        file_name = f"{index:06d}.png"
        if not cv2.imwrite(str(directory / IMAGES_NAME / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {directory / IMAGES_NAME / file_name}")
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **annotation})
    coco = {
        "info": {"description": f"dcnv2_plugin synthetic shapes, {split_name} split", **describe(params, split)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(params.classes)],
    }
    with open(directory / JSON_NAME, "w") as f:
        json.dump(coco, f)


def ensure_split(
    split_name: str,
    root: Optional[Path] = None,
    params: ShapesParams = DEFAULT_PARAMS,
    split: Optional[SplitSpec] = None,
) -> SplitFiles:
    """The split's files, generating them first if they are not there yet.

    `split` defaults to DEFAULT_SPLITS[split_name], `root` to default_root().
    """
    root = Path(root) if root is not None else default_root()
    split = split if split is not None else DEFAULT_SPLITS[split_name]
    files = split_files(root, split_name, params, split)
    if files.json_file.exists():
        return files
    root.mkdir(parents=True, exist_ok=True)
    # Written into a scratch folder and renamed into place in one step, so an
    # interrupted run never leaves a half dataset that looks complete.
    scratch = Path(tempfile.mkdtemp(prefix=f".{files.directory.name}.", dir=root))
    try:
        _write_split(scratch, split_name, params, split)
        os.rename(scratch, files.directory)
    except OSError:
        if not files.json_file.exists():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Wrote the shapes %s split (%d images) to %s", split_name, split.num_images, files.directory)
    return files


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"dataset root (default: ${DATASETS_ENV} or ~/.cache/dcnv2_plugin/datasets)",
    )
    parser.add_argument("--train-images", type=int, default=DEFAULT_SPLITS["train"].num_images)
    parser.add_argument("--val-images", type=int, default=DEFAULT_SPLITS["val"].num_images)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="train images use seed 2*SEED and val images 2*SEED+1, so the splits never share images",
    )
    parser.add_argument("--image-size", type=int, default=DEFAULT_PARAMS.image_size)
    args = parser.parse_args(argv)

    params = ShapesParams(image_size=args.image_size)
    splits = {
        "train": SplitSpec(args.train_images, seed=2 * args.seed),
        "val": SplitSpec(args.val_images, seed=2 * args.seed + 1),
    }
    for split_name, split in splits.items():
        files = ensure_split(split_name, args.output, params, split)
        print(f"{split_name}: {files.json_file} (images in {files.image_root})")


if __name__ == "__main__":
    main()
