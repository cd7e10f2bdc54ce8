"""Deformable convolution on batches larger than one unit of the kernels' work
(the CPU kernels' tiles of output positions, the CUDA kernels' chunks of
images): forward and every gradient against the images one by one, and the
kernels' scratch memory against the batch size."""

import sys

import pytest
import torch
import torchvision
from helpers import DEVICES, run_python

from dcnv2_plugin.ops import deform_conv2d

# Per device: (batch, channels, out channels, height, width, offset groups).
# CPU, float64: a patch row holds 32 x 9 values (2304 bytes), so the
# backward's 16 MiB tiles hold about 7300 positions and the batch's 7500 take
# two, the second starting inside image 1; the forward's 4 MiB tiles take
# five, also across image boundaries. Each image alone is one backward tile.
# CUDA, float64: an image's column buffer (128 x 9 x 100 x 100 values) is 88
# MiB, so the 256 MiB budget holds two images: chunks of 2, 2 and 1 images.
BATCHES = {
    "cpu": (3, 32, 16, 50, 50, 2),
    "cuda": (5, 128, 16, 100, 100, 1),
}


def make_inputs(device):
    batch, channels, out_channels, height, width, offset_groups = BATCHES[device]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64)
    weight = torch.randn(out_channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.1
    bias = torch.randn(out_channels, generator=g, dtype=torch.float64)
    offset = torch.randn(batch, 2 * offset_groups * 9, height, width, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(batch, offset_groups * 9, height, width, generator=g, dtype=torch.float64)
    grad = torch.randn(batch, out_channels, height, width, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, offset, weight, bias, mask)], grad.to(device)


def forward_and_gradients(conv, x, offset, weight, bias, mask, grad):
    inputs = [t.detach().requires_grad_() for t in (x, offset, weight, bias, mask)]
    out = conv(inputs[0], inputs[1], inputs[2], inputs[3], padding=1, mask=inputs[4])
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


NAMES = ["output", "grad input", "grad offset", "grad weight", "grad bias", "grad mask"]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_spanning_several_tiles_matches_image_by_image(device):
    (x, offset, weight, bias, mask), grad = make_inputs(device)
    batched = forward_and_gradients(deform_conv2d, x, offset, weight, bias, mask, grad)

    one_by_one = []
    for b in range(x.shape[0]):
        image = slice(b, b + 1)
        one_by_one.append(
            forward_and_gradients(deform_conv2d, x[image], offset[image], weight, bias, mask[image], grad[image])
        )
    # Per-image tensors concatenate; the weight and bias gradients sum over the images.
    expected = [torch.cat([r[i] for r in one_by_one]) for i in (0, 1, 2)]
    expected += [sum(r[i] for r in one_by_one) for i in (3, 4)]
    expected += [torch.cat([r[5] for r in one_by_one])]
    for name, ours, theirs in zip(NAMES, batched, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")

    # And they are torchvision's.
    reference = forward_and_gradients(torchvision.ops.deform_conv2d, x, offset, weight, bias, mask, grad)
    for name, ours, theirs in zip(NAMES, batched, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


# Scratch memory: float32, 128 channels (a patch row is 4608 bytes) on 58 x 60
# maps (3480 positions): the backward's 16 MiB tiles then hold one image each
# whatever the batch, and an image's patch rows take 16 MB. A kernel whose
# scratch grew with the batch (patch rows for all images at once, say) would
# add at least that much per image; the input-sized copies the kernels make
# (the channels-last input and its gradient, the gradients themselves) add
# about a quarter of it.
MEMORY_SHAPE = dict(channels=128, out_channels=8, height=58, width=60)
PATCH_ROW_BYTES_PER_IMAGE = 128 * 9 * 58 * 60 * 4

MEMORY_PROBE = """
import re, torch
from dcnv2_plugin.ops import deform_conv2d

torch.set_num_threads(1)
channels, out_channels, height, width = SHAPE

def inputs(batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=g).requires_grad_()
    weight = (torch.randn(out_channels, channels, 3, 3, generator=g) * 0.05).requires_grad_()
    offset = (torch.randn(batch, 18, height, width, generator=g) * 2).requires_grad_()
    mask = torch.rand(batch, 9, height, width, generator=g).requires_grad_()
    return x, offset, weight, mask

def forward_backward(x, offset, weight, mask):
    out = deform_conv2d(x, offset, weight, padding=1, mask=mask)
    out.backward(torch.ones_like(out))

def kib(field):  # VmRSS: resident now; VmHWM: its peak
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

forward_backward(*inputs(1))  # one-off costs (libraries, thread pools) before measuring
for batch in BATCHES:
    tensors = inputs(batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak to the resident size now
    resident = kib("VmRSS")
    forward_backward(*tensors)
    print((kib("VmHWM") - resident) * 1024)
    del tensors
"""


def resident_growth_per_call(batches):
    """Peak resident memory that a forward and backward add, for each batch
    size, in a fresh process. glibc then maps every block of 64 KiB or more
    on its own and unmaps it when freed, so the resident size follows the
    live buffers."""
    shape = tuple(MEMORY_SHAPE.values())
    result = run_python(
        MEMORY_PROBE.replace("SHAPE", repr(shape)).replace("BATCHES", repr(tuple(batches))),
        env={"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"},
    )
    return [int(line) for line in result.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident size from /proc")
def test_cpu_scratch_memory_does_not_grow_with_the_batch():
    small, large = resident_growth_per_call([2, 8])
    # The probe sees the scratch: one tile's patch rows and their gradient.
    assert small > PATCH_ROW_BYTES_PER_IMAGE
    per_image = (large - small) / 6
    assert per_image < PATCH_ROW_BYTES_PER_IMAGE / 2, (
        f"{per_image / 2**20:.1f} MiB more per image; one image's patch rows are "
        f"{PATCH_ROW_BYTES_PER_IMAGE / 2**20:.1f} MiB"
    )


@pytest.mark.parametrize("device", DEVICES[1:])
def test_cuda_column_memory_does_not_grow_with_the_batch(device):
    # An image's column buffer is 16 MB here: the 256 MiB budget holds 16
    # images, so batches of 16 and 48 use columns of the same size.
    shape = MEMORY_SHAPE
    weight = (torch.randn(shape["out_channels"], shape["channels"], 3, 3, device=device) * 0.05).requires_grad_()

    def memory_of_one_call(batch):
        x = torch.randn(batch, shape["channels"], shape["height"], shape["width"], device=device, requires_grad=True)
        offset = torch.randn(batch, 18, shape["height"], shape["width"], device=device, requires_grad=True)
        mask = torch.rand(batch, 9, shape["height"], shape["width"], device=device, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = deform_conv2d(x, offset, weight, padding=1, mask=mask)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    small, large = memory_of_one_call(16), memory_of_one_call(48)
    assert small > 16 * PATCH_ROW_BYTES_PER_IMAGE  # the columns of a full chunk
    per_image = (large - small) / 32
    assert per_image < PATCH_ROW_BYTES_PER_IMAGE / 2, f"{per_image / 2**20:.1f} MiB more per image"
