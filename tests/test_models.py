"""Forward shapes of every backbone and the CAM layer each one names."""

from __future__ import annotations

import pytest
import torch

from tumorlens.models import BACKBONES, DualHeadNet
from tumorlens.models.dualhead import ClassifierView


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_forward_shapes(backbone):
    torch.manual_seed(0)
    net = DualHeadNet(backbone).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        logits, seg = net(x)
        emb = net.embed(x)
    assert logits.shape == (2, 4) and seg.shape == (2, 1, 96, 96)
    assert emb.shape == (2, net.enc_channels[-1])
    layer = dict(net.named_modules())[net.cam_layer]
    seen = {}
    h = layer.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        ClassifierView(net)(x)
    h.remove()
    assert seen["a"].shape[1] == net.enc_channels[-1] and seen["a"].shape[-1] == 3  # stride 32


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        DualHeadNet("vgg99")
