"""Checkpoints that are written atomically, verified when read, and never run
code from the file.

- `save` writes each checkpoint to a temporary file renamed into place, then
  `last_checkpoint` the same way, so a process killed while saving leaves the
  previous checkpoint in force. Each checkpoint carries a SHA-256 of every
  tensor and one of all its other values.
- Loading refuses a missing, empty, truncated or foreign file, and a
  checkpoint whose contents no longer match its checksums, with one
  `CheckpointError` that names the file and the problem.
- `.pth` files are read with `torch.load(weights_only=True)`; detectron2 and
  Caffe2 model-zoo `.pkl` files with an unpickler that rebuilds only numpy
  arrays and plain containers.
- A geometry layer (offsets, modulation, STN) whose shape in the checkpoint
  differs from the model's is an error: detectron2 would skip it with a
  warning and leave the layer at its initialization.
"""

import hashlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer

from ..ops import GeometryPredictor

# The key of the checksums inside a checkpoint written here.
CHECKSUM_KEY = "__sha256__"
# Its entry for every value that is not a tensor (iteration, learning rates, ...).
NON_TENSOR_VALUES = "<values other than tensors>"

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_PROTOCOL_2 = b"\x80\x02"  # torch.save's legacy format, and Python 2 pickles


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"cannot load checkpoint {path}: {problem}")
        self.path = path


class _GeometryShapeMismatch(ValueError):
    """Raised while the model loads, where the file's path is not at hand."""


def _tensor_digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_digests(data: Mapping) -> Dict[str, str]:
    """SHA-256 of each tensor in `data`, by its path ("model/backbone...weight",
    "trainer/_trainer/optimizer/state/3/momentum_buffer"), and under
    NON_TENSOR_VALUES one of every other value with its path."""
    digests = {}
    others = hashlib.sha256()

    def visit(path: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digests[path] = _tensor_digest(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{path}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{path}/{index}", item)
        else:
            others.update(f"{path}={value!r}\n".encode())

    for key, value in data.items():
        visit(str(key), value)
    digests[NON_TENSOR_VALUES] = others.hexdigest()
    return digests


def corrupted_entries(data: Mapping, written: Mapping[str, str]) -> List[str]:
    """The paths in `data` whose checksum differs from the one `written` with it."""
    current = checkpoint_digests(data)
    return sorted(path for path in set(current) | set(written) if current.get(path) != written.get(path))


def _verify_checksums(path: str, data: dict) -> dict:
    """`data` without its checksums, after checking them (when it has any)."""
    written = data.pop(CHECKSUM_KEY, None)
    if written is None:
        return data
    corrupted = corrupted_entries(data, written)
    if corrupted:
        shown = ", ".join(corrupted[:5]) + (f" and {len(corrupted) - 5} more" if len(corrupted) > 5 else "")
        raise CheckpointError(
            path,
            f"it is corrupted: {shown} no longer match the checksums written with it; "
            "the file was damaged after it was saved: use another checkpoint",
        )
    return data


def _describe_torch_load_error(path: str, error: Exception) -> str:
    with open(path, "rb") as file:
        head = file.read(4)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if head != _ZIP_MAGIC and not head.startswith(_PICKLE_PROTOCOL_2):
        return f"it is not a PyTorch checkpoint (it starts with the bytes {head!r})"
    if isinstance(error, pickle.UnpicklingError) and message.startswith("Weights only load failed"):
        return (
            "it holds Python objects other than tensors and plain containers, which are refused because "
            f"loading them could run code (torch.load(weights_only=True): {message})"
        )
    return f"it is truncated or damaged ({type(error).__name__}: {message})"


def load_torch_checkpoint(path: str) -> dict:
    """A `.pth` file's contents, read with weights_only=True and verified
    against its checksums when it has them."""
    try:
        data = torch.load(path, map_location=torch.device("cpu"), weights_only=True)
    except Exception as error:
        raise CheckpointError(path, _describe_torch_load_error(path, error)) from error
    if not isinstance(data, dict):
        raise CheckpointError(path, f"it holds a {type(data).__name__}, not a dict of tensors")
    return _verify_checksums(path, data)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class WeightsUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers, and nothing else: a pickle
    can name any callable, which unpickling would call."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        # How protocol-5 pickles rebuild an array from its bytes.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # How protocol-2 pickles spell bytes: _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(
            f"it refers to {module}.{name}, which weights have no use for; it is refused because "
            "unpickling it could run code"
        )


def load_weights_pickle(path: str) -> dict:
    """A detectron2 or Caffe2 model-zoo `.pkl` file's contents, unpickled with
    `WeightsUnpickler` (Python 2 pickles decode as latin1, as in detectron2)."""
    try:
        with open(path, "rb") as file:
            data = WeightsUnpickler(file, encoding="latin1").load()
    except _RefusedGlobal as error:
        raise CheckpointError(path, str(error)) from error
    except pickle.UnpicklingError as error:
        problem = "it is truncated or damaged" if "truncated" in str(error) else "it is not a pickle file"
        raise CheckpointError(path, f"{problem} ({error})") from error
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CheckpointError(path, f"it is truncated or damaged ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(path, f"it holds a {type(data).__name__}, not a dict of weights")
    return data


def _detectron2_pickle_layout(data: dict) -> dict:
    """detectron2's reading of a `.pkl` (DetectionCheckpointer._load_file):
    its own model zoo's layout as is, Caffe2's converted by name matching."""
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:  # Caffe2 detection models; ImageNet models have no "blobs"
        data = data["blobs"]
    weights = {key: value for key, value in data.items() if not key.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def _write_atomically(path: str, write: Callable) -> None:
    """`write(file)` into a temporary file beside `path`, then renames it to
    `path`: readers see the old file or the complete new one."""
    directory = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class _VerifiedTorchLoad(FvcoreCheckpointer):
    """detectron2's `DetectionCheckpointer._load_file` reads `.pth` files
    through fvcore's `Checkpointer._load_file` (its `super()`). This class sits
    between the two in `VerifiedCheckpointer`'s method order, so that read is
    weights-only and checked."""

    def _load_file(self, f: str) -> dict:
        return load_torch_checkpoint(f)


class VerifiedCheckpointer(DetectionCheckpointer, _VerifiedTorchLoad):
    """detectron2's `DetectionCheckpointer` with atomic saves, checksums,
    safe loading and loud geometry-layer mismatches (see the module doc)."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, checkpointable in self.checkpointables.items():
            data[key] = checkpointable.state_dict()
        data.update(kwargs)
        data[CHECKSUM_KEY] = checkpoint_digests(data)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        _write_atomically(path, lambda file: torch.save(data, file))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _write_atomically(
            os.path.join(self.save_dir, "last_checkpoint"), lambda file: file.write(last_filename_basename.encode())
        )

    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(path, "there is no such file")
        try:
            return super().load(path, *args, **kwargs)
        except _GeometryShapeMismatch as mismatch:
            raise CheckpointError(path, str(mismatch)) from None

    def _load_file(self, filename: str) -> dict:
        if os.path.getsize(filename) == 0:
            raise CheckpointError(filename, "it is empty (0 bytes)")
        if filename.endswith(".pkl"):
            return _detectron2_pickle_layout(load_weights_pickle(filename))
        return super()._load_file(filename)

    def _load_model(self, checkpoint: dict):
        incompatible = super()._load_model(checkpoint)
        geometry_keys = {
            f"{module_name}.{key}"
            for module_name, module in self.model.named_modules()
            if isinstance(module, GeometryPredictor)
            for key in module.state_dict()
        }
        mismatched = [
            f"{key}: {tuple(in_checkpoint)} in the checkpoint, {tuple(in_model)} in the model"
            for key, in_checkpoint, in_model in incompatible.incorrect_shapes
            if key in geometry_keys
        ]
        if mismatched:
            more = f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
            raise _GeometryShapeMismatch(
                "its geometry layers (offsets, modulation, STN) have other shapes than the model's: "
                + "; ".join(mismatched[:4])
                + more
                + ". They follow MODEL.RESNETS.DEFORM_NUM_GROUPS and DEFORM_MODULATED (deformable convs), "
                "the pooler type, POOLER_RESOLUTION and MODEL.DCNV2.DEFORM_POOL.FC_DIM (deformable RoI pooling) and "
                "MODEL.DCNV2.STN.HIDDEN_DIM: set them as in the config the checkpoint was trained with",
            )
        return incompatible
