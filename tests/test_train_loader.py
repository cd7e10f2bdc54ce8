"""The resumable training loader: a loader restored from a saved state yields
the batches the original would have yielded next, for any number of
workers, and its augmentations leave the training process's generators
alone."""

import io
import random

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from dcnv2_plugin.engine.train_loader import PositionSeededStream, ResumableTrainLoader

# Landscape and portrait images, so that the aspect-ratio groups hold
# elements between batches.
DATASET = [{"image_id": i, "width": 40 if i % 3 else 20, "height": 30} for i in range(11)]


def augment(record):
    """Stands in for detectron2's DatasetMapper: reads the three CPU generators."""
    return {**record, "draws": (random.random(), float(np.random.rand()), float(torch.rand(())))}


def make_loader(num_workers=0, grouping=True, seed=5):
    stream = PositionSeededStream(DATASET, TrainingSampler(len(DATASET), seed=3), augment, seed=seed, rank=0)
    return ResumableTrainLoader(stream, batch_size=3, aspect_ratio_grouping=grouping, num_workers=num_workers)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def through_checkpoint(state):
    """`state` after torch.save and a weights-only torch.load, as in a checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("grouping", [True, False], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_loader_continues_with_the_next_batches(num_workers, grouping):
    uninterrupted = take(iter(make_loader(num_workers, grouping)), 12)

    first = make_loader(num_workers, grouping)
    batches = iter(first)
    assert take(batches, 5) == uninterrupted[:5]
    state = through_checkpoint(first.state_dict())
    if grouping:
        assert sum(len(group) for group in state["waiting"]) > 0, "nothing waits: the test would not replay"

    restored = make_loader(num_workers, grouping)
    restored_batches = iter(restored)  # created before the state is loaded, as detectron2's trainer does
    restored.load_state_dict(state)
    assert take(restored_batches, 7) == uninterrupted[5:]


def test_the_batches_do_not_depend_on_the_number_of_workers():
    assert take(iter(make_loader(num_workers=0)), 8) == take(iter(make_loader(num_workers=2)), 8)


def test_the_augmentations_depend_on_the_seed():
    assert take(iter(make_loader(seed=5)), 4) != take(iter(make_loader(seed=6)), 4)


def test_mapping_in_this_process_leaves_its_generators_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(()), np.random.rand(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    take(iter(make_loader(num_workers=0)), 3)
    assert (torch.rand(()), np.random.rand(), random.random()) == expected


def test_a_state_from_a_loader_without_grouping_is_refused():
    state = make_loader(grouping=False).state_dict()
    with pytest.raises(ValueError, match="DATALOADER.ASPECT_RATIO_GROUPING"):
        make_loader(grouping=True).load_state_dict(state)
