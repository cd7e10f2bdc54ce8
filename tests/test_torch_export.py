"""A whole deformable backbone (the demo's DCNv2 ResNet-FPN, its geometry
branches drawn at random so that the convs sample 1-3 pixels off the grid)
through torch.export and torch.compile(fullgraph=True)."""

import pytest
import torch
from detectron2.modeling import build_backbone
from helpers import CONFIG_DIR, draw_geometry

from dcnv2_plugin.config import load_config


def demo_backbone():
    torch.manual_seed(0)
    cfg = load_config(str(CONFIG_DIR / "demo" / "dcnv2.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    backbone = build_backbone(cfg).eval()
    draw_geometry(backbone, 0.05)
    return backbone, torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def test_torch_export_of_the_deformable_backbone():
    backbone, x = demo_backbone()
    program = torch.export.export(backbone, (x,))
    assert sum(n.target == torch.ops.dcnv2.deform_conv2d.default for n in program.graph.nodes) == 13
    with torch.no_grad():
        expected, exported = backbone(x), program.module()(x)
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_fullgraph_of_the_deformable_backbone():
    backbone, x = demo_backbone()
    compiled = torch.compile(backbone, fullgraph=True)
    with torch.no_grad():
        expected, out = backbone(x), compiled(x)
    for name in expected:
        # Inductor fuses the layers around the operators (BN, ReLU, adds).
        torch.testing.assert_close(out[name], expected[name], rtol=1e-4, atol=1e-4)
