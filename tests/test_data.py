"""The embedded shapes dataset: determinism, COCO validity, exact masks, registration, caching."""

import json
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from dcnv2_plugin.config import load_config
from dcnv2_plugin.data import (
    CLASS_NAMES,
    DEFAULT_PARAMS,
    ShapesParams,
    SplitSpec,
    register_embedded_datasets,
    register_shapes_dataset,
)
from dcnv2_plugin.data.generate import default_root, draw_image, ensure_split, main

SMALL_SPLIT = SplitSpec(num_images=16, seed=7)


def _split_bytes(files):
    """The JSON and every image of a split, as bytes, by relative path."""
    contents = {"annotations.json": files.json_file.read_bytes()}
    for image in sorted(files.image_root.iterdir()):
        contents[image.name] = image.read_bytes()
    return contents


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    return ensure_split("train", tmp_path_factory.mktemp("shapes"), DEFAULT_PARAMS, SMALL_SPLIT)


@pytest.fixture(scope="module")
def small_coco(small_split):
    return COCO(str(small_split.json_file))


def test_same_seed_gives_byte_identical_files(small_split, tmp_path):
    again = ensure_split("train", tmp_path, DEFAULT_PARAMS, SMALL_SPLIT)
    assert again.json_file != small_split.json_file
    assert _split_bytes(again) == _split_bytes(small_split)


def test_images_depend_on_seed_and_index_only():
    image, annotations = draw_image(DEFAULT_PARAMS, SMALL_SPLIT, 3)
    # Image 3 of a longer split with the same seed is the same image...
    same_image, same_annotations = draw_image(DEFAULT_PARAMS, SplitSpec(num_images=500, seed=7), 3)
    np.testing.assert_array_equal(image, same_image)
    assert annotations == same_annotations
    # ...and another seed or index draws a different one.
    assert not np.array_equal(image, draw_image(DEFAULT_PARAMS, SplitSpec(16, seed=8), 3)[0])
    assert not np.array_equal(image, draw_image(DEFAULT_PARAMS, SMALL_SPLIT, 4)[0])


def test_json_is_valid_coco(small_coco):
    assert len(small_coco.getImgIds()) == SMALL_SPLIT.num_images
    assert [c["name"] for c in small_coco.loadCats(small_coco.getCatIds())] == list(CLASS_NAMES)
    assert len(small_coco.getAnnIds()) >= SMALL_SPLIT.num_images  # at least one object per image
    for image in small_coco.loadImgs(small_coco.getImgIds()):
        assert (image["height"], image["width"]) == (DEFAULT_PARAMS.image_size,) * 2
        assert small_coco.getAnnIds(imgIds=image["id"]), f"image {image['id']} has no objects"


def test_every_category_is_used(small_coco):
    used = {a["category_id"] for a in small_coco.loadAnns(small_coco.getAnnIds())}
    assert used == set(small_coco.getCatIds())


def test_annotations_lie_inside_their_images(small_coco):
    for annotation in small_coco.loadAnns(small_coco.getAnnIds()):
        image = small_coco.imgs[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0
        assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"]


def test_masks_agree_with_boxes_and_areas(small_coco):
    for annotation in small_coco.loadAnns(small_coco.getAnnIds()):
        mask = small_coco.annToMask(annotation).astype(bool)
        ys, xs = np.nonzero(mask)
        tight_box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert annotation["bbox"] == tight_box
        assert annotation["area"] == mask.sum() == mask_util.area(annotation["segmentation"])
        assert annotation["area"] >= DEFAULT_PARAMS.min_visible_area
        assert annotation["attributes"]["visible_fraction"] >= DEFAULT_PARAMS.min_visible_fraction


def test_occluded_parts_belong_to_the_object_on_top(small_coco):
    """Visible masks of one image never overlap, and some objects are partly hidden."""
    occluded = 0
    for image_id in small_coco.getImgIds():
        masks = [small_coco.annToMask(a) for a in small_coco.loadAnns(small_coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() <= 1
    for annotation in small_coco.loadAnns(small_coco.getAnnIds()):
        occluded += annotation["attributes"]["visible_fraction"] < 1
    assert occluded > 0


def test_second_call_reuses_the_cache(tmp_path):
    split = SplitSpec(num_images=2, seed=0)
    first = ensure_split("val", tmp_path, DEFAULT_PARAMS, split)
    stamps = {p: p.stat().st_mtime_ns for p in [first.json_file, *first.image_root.iterdir()]}
    second = ensure_split("val", tmp_path, DEFAULT_PARAMS, split)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Other parameters get their own folder instead of the cached one.
    changed = ensure_split("val", tmp_path, ShapesParams(noise_sigma=0.0), split)
    assert changed.json_file.parent != first.json_file.parent
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.json_file.parent.name, changed.json_file.parent.name]
    )  # no scratch folders left


def test_registration_generates_on_first_use(tmp_path):
    prefix = f"test_shapes_{uuid.uuid4().hex[:8]}"
    names = register_shapes_dataset(tmp_path, name_prefix=prefix, splits={"train": SplitSpec(3, seed=0)})
    name = names["train"]
    try:
        assert name == f"{prefix}_train"
        assert not any(tmp_path.iterdir()), "registration alone must not generate"
        metadata = MetadataCatalog.get(name)
        assert metadata.evaluator_type == "coco"
        assert metadata.thing_classes == list(CLASS_NAMES)

        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 3
        assert json.loads(open(metadata.json_file).read())["images"][0]["file_name"] == "000000.png"
        for record in dicts:
            assert {"file_name", "height", "width", "image_id", "annotations"} <= set(record)
            assert record["file_name"].startswith(metadata.image_root)
            for annotation in record["annotations"]:
                assert {"bbox", "bbox_mode", "category_id", "segmentation", "iscrowd"} <= set(annotation)
                assert 0 <= annotation["category_id"] < len(CLASS_NAMES)

        # The same registration again is a no-op; the same names for other files are refused.
        assert register_shapes_dataset(tmp_path, name_prefix=prefix, splits={"train": SplitSpec(3, seed=0)}) == names
        with pytest.raises(ValueError, match="already registered"):
            register_shapes_dataset(tmp_path, name_prefix=prefix, splits={"train": SplitSpec(4, seed=0)})
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_default_names_are_registered_for_a_config_that_uses_them():
    assert register_shapes_dataset() == {"train": "dcnv2_shapes_train", "val": "dcnv2_shapes_val"}
    for name in ("dcnv2_shapes_train", "dcnv2_shapes_val"):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).json_file.startswith(str(default_root()))
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    register_embedded_datasets(load_config("COCO-Detection/faster_rcnn_R_50_FPN_regular.yaml"))
    assert "dcnv2_shapes_train" not in DatasetCatalog.list()
    register_embedded_datasets(load_config("demo/dcnv2.yaml"))
    assert {"dcnv2_shapes_train", "dcnv2_shapes_val"} <= set(DatasetCatalog.list())


def test_command_line_writes_both_splits(tmp_path, capsys):
    main(["--output", str(tmp_path), "--train-images", "2", "--val-images", "1", "--image-size", "96"])
    printed = capsys.readouterr().out
    for split_name, count in [("train", 2), ("val", 1)]:
        (folder,) = tmp_path.glob(f"shapes-{split_name}-*")
        assert str(folder) in printed
        assert len(list((folder / "images").iterdir())) == count
        assert json.loads((folder / "annotations.json").read_text())["images"][0]["width"] == 96


def test_unknown_class_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown shape classes"):
        ShapesParams(classes=("star", "blob"))
