"""VerifiedCheckpointer: atomic saves, checksums, one clear error per bad
file, loading that never runs code, and loud geometry-layer mismatches."""

import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from dcnv2_plugin.engine.checkpoint import CheckpointError, VerifiedCheckpointer
from dcnv2_plugin.ops import DeformConv2dPack


class TinyDetector(nn.Module):
    """A deformable conv (its offset conv is a geometry layer) and a head."""

    def __init__(self, offset_groups: int = 1, num_classes: int = 3):
        super().__init__()
        self.deform = DeformConv2dPack(4, 4, 3, padding=1, offset_groups=offset_groups)
        self.head = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.head.weight.fill_(3.25)  # a byte pattern to find in the file
            self.deform.conv_offset.weight.normal_()


class Runs(nn.Module):
    """Anything a pickle can make its loader call."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def saved(tmp_path, model=None, **extra):
    model = model or TinyDetector()
    VerifiedCheckpointer(model, save_dir=str(tmp_path)).save("checkpoint", **extra)
    return model, tmp_path / "checkpoint.pth"


def load_error(path, model=None) -> str:
    with pytest.raises(CheckpointError) as error:
        VerifiedCheckpointer(model or TinyDetector()).load(str(path))
    message = str(error.value)
    assert str(path) in message
    return message


def flip_byte_at(path, pattern: bytes, offset_in_pattern: int):
    data = bytearray(path.read_bytes())
    start = data.find(pattern)
    assert start >= 0 and data.find(pattern, start + 1) < 0, "the pattern must be in the file once"
    data[start + offset_in_pattern] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_saved_checkpoint_loads_back_and_is_tagged(tmp_path):
    model, path = saved(tmp_path, iteration=7)
    restored = TinyDetector()
    extra = VerifiedCheckpointer(restored).load(str(path))
    assert extra == {"iteration": 7}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint.pth"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "last_checkpoint"]  # no temporary file left


def test_a_flipped_byte_inside_a_tensor_is_named(tmp_path):
    _, path = saved(tmp_path)
    flip_byte_at(path, struct.pack("<f", 3.25) * 12, 21)
    message = load_error(path)
    assert "corrupted" in message and "model/head.weight" in message
    assert "model/deform" not in message


def test_a_changed_value_outside_the_tensors_is_detected(tmp_path):
    _, path = saved(tmp_path, iteration=1234567)
    flip_byte_at(path, struct.pack("<i", 1234567), 1)
    assert "<values other than tensors>" in load_error(path)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda data: b"", "it is empty (0 bytes)"),
        (lambda data: data[: len(data) // 2], "it is truncated or damaged"),
        (lambda data: data[:-30], "it is truncated or damaged"),
        (lambda data: b"name,weight\nhead,1.0\n", "it is not a PyTorch checkpoint"),
    ],
    ids=["empty", "half", "end cut", "foreign"],
)
def test_a_damaged_or_foreign_file_gives_one_error_naming_it(tmp_path, damage, problem):
    _, path = saved(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    assert problem in load_error(path)


def test_a_missing_file_is_named(tmp_path):
    assert "there is no such file" in load_error(tmp_path / "nowhere.pth")


def test_a_pth_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 4)}, "extra": Runs(marker)}, path)
    assert "could run code" in load_error(path)
    assert not marker.exists()


def test_a_pkl_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"head.weight": Runs(marker)}, "__author__": "someone"}))
    message = load_error(path)
    assert "it refers to io.open" in message and "could run code" in message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_detectron2_model_zoo_pkl_loads(tmp_path, protocol):
    source = TinyDetector()
    weights = {name: tensor.numpy() for name, tensor in source.state_dict().items()}
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    restored = TinyDetector()
    VerifiedCheckpointer(restored).load(str(path))
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name


def test_a_truncated_pkl_is_named(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(100, np.float32)}, "__author__": "x"})[:-40])
    assert "truncated or damaged" in load_error(path)


def test_geometry_layers_of_another_shape_are_an_error(tmp_path):
    _, path = saved(tmp_path, TinyDetector(offset_groups=1))
    message = load_error(path, TinyDetector(offset_groups=2))
    assert "deform.conv_offset.weight: (27, 4, 3, 3) in the checkpoint, (54, 4, 3, 3) in the model" in message
    assert "MODEL.RESNETS.DEFORM_NUM_GROUPS" in message


def test_other_layers_of_another_shape_keep_detectron2s_warning(tmp_path, caplog):
    source, path = saved(tmp_path, TinyDetector(num_classes=3))
    restored = TinyDetector(num_classes=5)
    with caplog.at_level(logging.WARNING):
        VerifiedCheckpointer(restored).load(str(path))
    assert "head.weight" in caplog.text
    assert torch.equal(restored.deform.conv_offset.weight, source.deform.conv_offset.weight)


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    before = path.read_bytes()

    def fail_midway(data, file):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        VerifiedCheckpointer(TinyDetector(), save_dir=str(tmp_path)).save("checkpoint")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "last_checkpoint"]
