"""Dual-head networks: one encoder from ``monai.networks.nets``, a classification head on its deepest
features and a U-Net-style segmentation decoder over its multi-scale features (arXiv 2605.06197).

Every encoder is cut into five stages with strides 2, 4, 8, 16 and 32, so one decoder serves all.
``DualHeadNet.cam_layer`` names the module whose output feeds the classifier: the saliency
methods hook it.
"""

from __future__ import annotations

import torch
from monai.networks import nets
from torch import nn
from torch.nn import functional as F


class StagedEncoder(nn.Module):
    """Runs ``stages`` in order and returns every stage's output."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class EfficientNetEncoder(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int):
        super().__init__()
        # momentum 0.1 instead of MONAI's 0.01: from scratch the slow running stats collapsed to one class
        self.net = nets.EfficientNetBNFeatures(
            "efficientnet-b0", pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels,
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
        )
        # the classifier-side head of EfficientNetBNFeatures is never used: drop it
        for name in ("_conv_head", "_bn1", "_fc"):
            setattr(self.net, name, nn.Identity())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)


def _densenet121(sd: int, ic: int) -> tuple[nn.Module, str]:
    f = nets.DenseNet121(spatial_dims=sd, in_channels=ic, out_channels=4).features
    stages = [
        nn.Sequential(f.conv0, f.norm0, f.relu0),
        nn.Sequential(f.pool0, f.denseblock1),
        nn.Sequential(f.transition1, f.denseblock2),
        nn.Sequential(f.transition2, f.denseblock3),
        nn.Sequential(f.transition3, f.denseblock4, f.norm5),
    ]
    return StagedEncoder(stages), "encoder.stages.4"


def _resnet18(sd: int, ic: int) -> tuple[nn.Module, str]:
    # conv1_t_stride=2: MONAI's default stride 1 costs 4x the compute for no gain at this size
    r = nets.resnet18(spatial_dims=sd, n_input_channels=ic, num_classes=4, conv1_t_stride=2)
    stages = [nn.Sequential(r.conv1, r.bn1, r.act), nn.Sequential(r.maxpool, r.layer1), r.layer2, r.layer3, r.layer4]
    return StagedEncoder(stages), "encoder.stages.4"


def _seresnet50(sd: int, ic: int) -> tuple[nn.Module, str]:
    s = nets.SEResNet50(spatial_dims=sd, in_channels=ic, num_classes=4)
    l0 = s.layer0
    stages = [nn.Sequential(l0.conv1, l0.bn1, l0.relu1), nn.Sequential(l0.pool, s.layer1), s.layer2, s.layer3, s.layer4]
    return StagedEncoder(stages), "encoder.stages.4"


def _efficientnet_b0(sd: int, ic: int) -> tuple[nn.Module, str]:
    return EfficientNetEncoder(sd, ic), "encoder.net._blocks.6"


BACKBONES = {
    "densenet121": _densenet121,
    "resnet18": _resnet18,
    "efficientnet-b0": _efficientnet_b0,
    "seresnet50": _seresnet50,
}


def _conv_block(sd: int, cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d if sd == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if sd == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
    )


class SegDecoder(nn.Module):
    """Upsample from the deepest features, concatenating each shallower stage (U-Net style)."""

    def __init__(self, sd: int, enc_channels: list[int], widths=(128, 64, 48, 32, 16)):
        super().__init__()
        self.sd = sd
        blocks = []
        cin = enc_channels[-1]
        skips = list(reversed(enc_channels[:-1])) + [0]
        for w, skip in zip(widths, skips, strict=True):
            blocks.append(_conv_block(sd, cin + skip, w))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.out = (nn.Conv2d if sd == 2 else nn.Conv3d)(cin, 1, 1)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        mode = "bilinear" if self.sd == 2 else "trilinear"
        x = feats[-1]
        skips = list(reversed(feats[:-1]))
        for i, block in enumerate(self.blocks):
            target = skips[i].shape[2:] if i < len(skips) else size
            x = F.interpolate(x, size=target, mode=mode, align_corners=False)
            if i < len(skips):
                x = torch.cat([x, skips[i]], dim=1)
            x = block(x)
        return self.out(x)


class DualHeadNet(nn.Module):
    """``forward(x) -> (class_logits [B, C], seg_logits [B, 1, *spatial])``."""

    def __init__(self, backbone: str = "densenet121", num_classes: int = 4, in_channels: int = 1,
                 spatial_dims: int = 2, dropout: float = 0.3, cam_layer: str | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.encoder, default_layer = BACKBONES[backbone](spatial_dims, in_channels)
        self.cam_layer = cam_layer or default_layer  # a model trained with a localisation loss names its own
        with torch.no_grad():
            was = self.encoder.training
            self.encoder.eval()
            probe = torch.zeros(1, in_channels, *([64] * spatial_dims))
            chans = [f.shape[1] for f in self.encoder(probe)]
            self.encoder.train(was)
        self.enc_channels = chans
        pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Sequential(nn.ReLU(), pool, nn.Flatten(1), nn.Dropout(dropout), nn.Linear(chans[-1], num_classes))
        self.decoder = SegDecoder(spatial_dims, chans)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return self.classifier(feats[-1]), self.decoder(feats, x.shape[2:])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled deepest features (what the classifier sees), for prototypes and Tip-Adapter."""
        feats = self.encoder(x)[-1]
        return self.classifier[2](self.classifier[1](self.classifier[0](feats)))


class ClassifierView(nn.Module):
    """The classification logits alone, for tools that expect ``model(x) -> logits`` (e.g. monai.visualize)."""

    def __init__(self, net: DualHeadNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def build_model(cfg: dict) -> DualHeadNet:
    m = cfg.get("model", cfg)
    return DualHeadNet(
        backbone=m.get("backbone", "densenet121"),
        num_classes=int(m.get("num_classes", 4)),
        in_channels=int(m.get("in_channels", 1)),
        spatial_dims=int(m.get("spatial_dims", 2)),
        dropout=float(m.get("dropout", 0.3)),
        cam_layer=m.get("cam_layer"),
    )
