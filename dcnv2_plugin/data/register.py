"""Registers the shapes dataset's splits in detectron2's catalogs.

Registration is cheap: it only records where each split will live. The
images are generated the first time a split's dicts are asked for
(`DatasetCatalog.get`, which building a data loader does), and reused after.
The metadata is what `register_coco_instances` records (json_file,
image_root, evaluator_type="coco"), so COCOEvaluator works unchanged.
"""

import functools
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .generate import default_root, ensure_split, split_files
from .params import DEFAULT_PARAMS, DEFAULT_SPLITS, ShapesParams, SplitSpec

DEFAULT_NAME_PREFIX = "dcnv2_shapes"


def _load_split(dataset_name: str, split_name: str, root: Path, params: ShapesParams, split: SplitSpec) -> List[Dict]:
    files = ensure_split(split_name, root, params, split)
    return load_coco_json(str(files.json_file), str(files.image_root), dataset_name)


def register_shapes_dataset(
    root: Optional[Path] = None,
    *,
    name_prefix: str = DEFAULT_NAME_PREFIX,
    params: ShapesParams = DEFAULT_PARAMS,
    splits: Mapping[str, SplitSpec] = DEFAULT_SPLITS,
) -> Dict[str, str]:
    """Registers one dataset per split, named f"{name_prefix}_{split}".

    Args:
        root: folder holding the generated splits; default `$DCNV2_DATASETS`,
            else ~/.cache/dcnv2_plugin/datasets.
        params: how images are drawn.
        splits: split name -> size and seed.
    Returns:
        split name -> registered dataset name.
    Registering the same names for the same files again does nothing;
    for other files it is an error.
    """
    root = Path(root) if root is not None else default_root()
    names = {}
    for split_name, split in splits.items():
        name = f"{name_prefix}_{split_name}"
        files = split_files(root, split_name, params, split)
        names[split_name] = name
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file")
            if registered == str(files.json_file):
                continue
            raise ValueError(
                f"dataset {name!r} is already registered for {registered}; pass another name_prefix, or "
                f"remove it first (DatasetCatalog.remove({name!r}); MetadataCatalog.remove({name!r}))"
            )
        DatasetCatalog.register(name, functools.partial(_load_split, name, split_name, root, params, split))
        MetadataCatalog.get(name).set(
            json_file=str(files.json_file),
            image_root=str(files.image_root),
            evaluator_type="coco",
            thing_classes=list(params.classes),
            # Category ids are 1..K in the JSON, in class order.
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(params.classes))},
        )
    return names


def register_embedded_datasets(cfg) -> None:
    """Registers the default splits if `cfg`'s DATASETS name one of them."""
    names = [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
    default_names = {f"{DEFAULT_NAME_PREFIX}_{split}" for split in DEFAULT_SPLITS}
    if default_names.intersection(names):
        register_shapes_dataset()
