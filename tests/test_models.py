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


def test_tumour_mask_falls_back_to_the_likeliest_region_only_under_a_tumour_call():
    import numpy as np

    from tumorlens.inference import tumour_mask

    prob = np.full((64, 64), 0.02, np.float32)
    prob[20:30, 30:40] = 0.3  # a faint blob below the 0.5 cut
    prob[25, 35] = 0.4
    assert not tumour_mask(prob, tumour_called=False).any()
    m = tumour_mask(prob, tumour_called=True)
    assert m.sum() == 100 and m[20:30, 30:40].all()  # >= half the peak: the blob, not the background
    prob[:5, :5] = 0.9  # once the head crosses the cut itself, its own mask is kept as it is
    assert tumour_mask(prob, tumour_called=True).sum() == 25
    assert not tumour_mask(np.zeros((4, 8, 8), np.float32), tumour_called=True).any()
    vol = np.zeros((4, 8, 8), np.float32)
    vol[1:3, 2:4, 2:4] = 0.2
    assert tumour_mask(vol, tumour_called=True).sum() == 8
