"""A training data loader whose position is saved with each checkpoint and
restored on resume, so that a resumed run trains on the batches an
uninterrupted run would have.

detectron2's loader cannot do this: its `TrainingSampler` starts its order
again in a new process, and each data-loader worker draws its augmentations
(random flips, sizes) from a generator seeded once when the worker starts,
so the k-th image's augmentation depends on everything that worker mapped
before. Here:

- the k-th element of this process's stream is `dataset[sampler index k]`,
  mapped (read and augmented) with the CPU generators seeded from
  (SEED, rank, k): it does not depend on which worker maps it, nor on what
  came before, so the batches are the same for any DATALOADER.NUM_WORKERS;
- batches are formed in this process, grouped by aspect ratio as detectron2
  does (`AspectRatioGroupedDataset`);
- the state is the first element not yet read and the elements waiting in
  the aspect-ratio groups; a restored loader maps the waiting ones again and
  skips the sampler to the first unread one (skipping reads indices only).
"""

import logging
from typing import Any, Dict, Iterator, List, Sequence

import detectron2.utils.comm as comm
import torch
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .random_state import seeded_cpu_rngs

logger = logging.getLogger(__name__)


def _unchanged(element):
    return element


class PositionSeededStream(IterableDataset):
    """(position, mapped element) for the planned positions of one process's
    stream of sampler indices; the planned entries are dealt to the
    data-loader workers in turn, which torch's DataLoader reads in turn."""

    def __init__(self, dataset: Sequence, sampler, mapper, seed: int, rank: int):
        self.dataset = dataset
        self.sampler = sampler
        self.mapper = mapper
        self.seed = seed
        self.rank = rank
        self.replayed_positions: List[int] = []  # positions before `start` to map again, ascending
        self.start = 0

    def _planned(self) -> Iterator:
        replayed = set(self.replayed_positions)
        for position, index in enumerate(self.sampler):
            if position >= self.start or position in replayed:
                yield position, index

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for entry, (position, index) in enumerate(self._planned()):
            if entry % num_workers != worker_id:
                continue
            with seeded_cpu_rngs(self.seed, self.rank, position):
                element = self.mapper(self.dataset[index])
            yield position, element


class ResumableTrainLoader:
    """Iterates over batches (lists of mapped dataset dicts) of this process,
    forever; `state_dict`/`load_state_dict` save and restore its position."""

    def __init__(self, stream: PositionSeededStream, batch_size: int, aspect_ratio_grouping: bool, num_workers: int):
        self.stream = stream
        self.batch_size = batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self._next_position = 0
        # Per aspect-ratio group, the positions of the elements waiting for a full batch.
        self._waiting: List[List[int]] = [[] for _ in range(2 if aspect_ratio_grouping else 1)]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "next_position": self._next_position,
            "waiting": [torch.tensor(positions, dtype=torch.int64) for positions in self._waiting],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Takes effect for the iterators created afterwards."""
        waiting = [group.tolist() for group in state["waiting"]]
        if len(waiting) != len(self._waiting):
            raise ValueError(
                "the checkpoint's data-loader state has "
                f"{len(waiting)} aspect-ratio group(s), this loader {len(self._waiting)}: "
                "DATALOADER.ASPECT_RATIO_GROUPING differs from the run that wrote it"
            )
        self._next_position = state["next_position"]
        self._waiting = waiting

    def _group(self, element: Dict[str, Any]) -> int:
        if not self.aspect_ratio_grouping:
            return 0
        return 0 if element["width"] > element["height"] else 1

    def __iter__(self):
        # A generator: nothing starts before the first batch is asked for, so
        # a state loaded after `iter()` (detectron2's trainer calls it when it
        # is built) still applies.
        self.stream.replayed_positions = sorted(position for group in self._waiting for position in group)
        self.stream.start = self._next_position
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_unchanged,
            # Its own generator: the workers' base seed is then not drawn from
            # the global one, whose state is part of what a checkpoint restores.
            generator=torch.Generator(),
        )
        groups: List[List[Any]] = [[] for _ in self._waiting]
        self._waiting = [[] for _ in self._waiting]
        for position, element in loader:
            self._next_position = max(self._next_position, position + 1)
            if element is None:  # the mapper dropped it, as detectron2's loader allows
                continue
            group = self._group(element)
            groups[group].append(element)
            self._waiting[group].append(position)
            if len(groups[group]) == self.batch_size:
                batch = groups[group]
                groups[group] = []
                self._waiting[group] = []
                yield batch


def _element_seed(cfg) -> int:
    if cfg.SEED >= 0:
        return cfg.SEED
    logger.warning(
        "SEED is %d: the data order and augmentations are random, and a resumed run draws new ones; "
        "set SEED to a fixed value to resume exactly",
        cfg.SEED,
    )
    return comm.shared_random_seed()


def build_resumable_train_loader(cfg):
    """detectron2's training data (dataset, sampler and mapper from the
    config, as `build_detection_train_loader` takes them) in a
    `ResumableTrainLoader`."""
    parts = _train_loader_from_config(cfg)
    if parts["sampler"] is None:  # an iterable dataset (newer detectron2): no positions to restore
        logger.warning("The training dataset is iterable: a resumed run cannot continue at its position")
        return build_detection_train_loader(cfg)
    world_size = comm.get_world_size()
    if parts["total_batch_size"] % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={parts['total_batch_size']} must be divisible by the number of processes "
            f"({world_size})"
        )
    dataset = parts["dataset"]
    if isinstance(dataset, list):  # as detectron2 does: one serialized buffer, not a list that workers copy
        dataset = DatasetFromList(dataset, copy=False)
    stream = PositionSeededStream(
        dataset, parts["sampler"], parts["mapper"], seed=_element_seed(cfg), rank=comm.get_rank()
    )
    return ResumableTrainLoader(
        stream,
        batch_size=parts["total_batch_size"] // world_size,
        aspect_ratio_grouping=parts["aspect_ratio_grouping"],
        num_workers=parts["num_workers"],
    )
