"""The part of detectron2's metrics that a resumed run needs to write the same
metrics.json as an uninterrupted run: the recent history of each scalar (the
writers print medians over a window of iterations), the latest values not
yet written, and the last iteration each writer wrote."""

import json
import os
from typing import Any, Dict, List

import torch
from detectron2.utils.events import EventStorage, EventWriter, JSONWriter, TensorboardXWriter
from fvcore.common.history_buffer import HistoryBuffer

# The longest window detectron2's writers read: the ETA is a median of the last 1000 iteration times.
HISTORY_KEPT = 1000

_WRITERS_WITH_POSITION = (JSONWriter, TensorboardXWriter)


def capture_metrics_state(storage: EventStorage, writers: List[EventWriter]) -> Dict[str, Any]:
    histories = {}
    for name, history in storage.histories().items():
        recent = history.values()[-HISTORY_KEPT:]
        histories[name] = {
            "values": torch.tensor([value for value, _ in recent], dtype=torch.float64),
            "iterations": torch.tensor([iteration for _, iteration in recent], dtype=torch.int64),
            "count": history._count,
            "global_avg": history._global_avg,
        }
    return {
        "histories": histories,
        "latest": {name: [value, iteration] for name, (value, iteration) in storage.latest().items()},
        "smoothing_hints": dict(storage.smoothing_hints()),
        "last_writes": {type(w).__name__: w._last_write for w in writers if isinstance(w, _WRITERS_WITH_POSITION)},
    }


def restore_metrics_state(state: Dict[str, Any], storage: EventStorage, writers: List[EventWriter]) -> None:
    """Puts the saved histories and latest values into `storage`, sets each
    writer back to where it had written, and drops from metrics.json the
    lines written after that (by the run that was interrupted), which the
    resumed run writes again."""
    for name, saved in state["histories"].items():
        history = HistoryBuffer()
        history._data = list(zip(saved["values"].tolist(), saved["iterations"].tolist()))
        history._count = saved["count"]
        history._global_avg = saved["global_avg"]
        storage._history[name] = history
    storage._latest_scalars.update({name: tuple(latest) for name, latest in state["latest"].items()})
    storage._smoothing_hints.update(state["smoothing_hints"])
    for writer in writers:
        last_write = state["last_writes"].get(type(writer).__name__)
        if last_write is None:
            continue
        writer._last_write = last_write
        if isinstance(writer, JSONWriter):
            drop_lines_after(writer._file_handle.name, last_write)


def drop_lines_after(metrics_file: str, last_iteration: int) -> None:
    """Rewrites `metrics_file` in place (its writer keeps appending to the
    same file) without the lines of iterations after `last_iteration` and
    without a line cut short."""
    if not os.path.exists(metrics_file):
        return
    with open(metrics_file, "r+") as file:
        kept = []
        for line in file.read().splitlines(keepends=True):
            try:
                if json.loads(line)["iteration"] <= last_iteration:
                    kept.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        file.seek(0)
        file.write("".join(kept))
        file.truncate()
