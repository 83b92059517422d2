"""DeepLabV3+ as in UniMatch (`model/semseg/deeplabv3plus.py`; specs/semivl_unimatch.md §1.3).

Encoder: any timm backbone with `features_only` (UniMatch's ResNet-101 with the deep stem is timm's
`resnet101s`; CPU recipes use resnet18 or efficientnet_lite0), or one of `OWN_BACKBONES` (UniMatch's
Xception-65, `xception65_unimatch`, models/xception.py), output stride 16 by dilation, taking the stride-4
feature c1 and the last feature c4. Head: ASPP (1x1, atrous 6/12/18, image pooling; bias-free
conv + BN + ReLU, no dropout), c1 reduced to 48 channels, two 3x3 conv-BN-ReLU, 1x1 classifier.

We write the head instead of using segmentation-models-pytorch's DeepLabV3Plus because that decoder
uses separable convolutions, ASPP dropout and a single fuse conv, which are not the papers' model, and
because UniMatch's feature-perturbation stream needs the encoder features between encoder and head.
Inputs of any size work (321, 801): features are resized to c1 and logits to the input with
align_corners=True, as in the original.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


def _unimatch_xception(output_stride: int) -> nn.Module:
    from semiseg_cli.models.xception import UniMatchXception

    return UniMatchXception(output_stride)


# backbone name -> builder(output_stride) of encoders that are not timm's: forward -> [c1, c4], feature_info
OWN_BACKBONES = {"xception65_unimatch": _unimatch_xception}


def conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv_bn_relu(cin, cout)

    def forward(self, x):
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
                                      + [ASPPPooling(cin, cout)])
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout)

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on c4 + low-level fusion with c1, returns logits at c1 resolution."""

    def __init__(self, c1_channels: int, c4_channels: int, num_classes: int, channels: int = 256, rates=(6, 12, 18)):
        super().__init__()
        # UniMatch: ASPP width 2048 // 8 = 256 for ResNet-101 and Xception-65, fuse convs 256 wide
        self.aspp = ASPP(c4_channels, channels, rates)
        self.reduce = conv_bn_relu(c1_channels, 48)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, c1, c4):
        c4 = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], dim=1)))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with an optional feature-perturbation output.

    Args:
        backbone: timm model name, e.g. "resnet101s", "resnet18", "efficientnet_lite0", "xception65".
        num_classes: K.
        output_stride: 8 or 16 (dilated last stages).
        head_channels: width of ASPP and the fuse convs (the papers: 256; CPU recipes use less, because
            the two 3x3 convs at stride 4 dominate the cost of a small encoder).

    Example:
        >>> model = DeepLabV3Plus("resnet18", num_classes=21)
        >>> model(torch.zeros(1, 3, 321, 321)).shape
        torch.Size([1, 21, 321, 321])
    """

    def __init__(self, backbone: str, num_classes: int, output_stride: int = 16, head_channels: int = 256):
        super().__init__()
        if backbone in OWN_BACKBONES:
            self.backbone = OWN_BACKBONES[backbone](output_stride)
        else:
            self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, -1),
                                              output_stride=output_stride)
        c1, c4 = self.backbone.feature_info.channels()
        self.head = DeepLabV3PlusHead(c1, c4, num_classes, head_channels)
        self.fp_dropout = nn.Dropout2d(0.5)

    def forward(self, x: torch.Tensor, need_fp: bool = False):
        """Logits [B, K, H, W]; with need_fp also the logits of channel-dropped features (UniMatch's FP
        stream: Dropout2d(0.5) on c1 and c4, decoded in the same batch as the clean features)."""
        h, w = x.shape[-2:]
        c1, c4 = self.backbone(x)
        if need_fp:
            logits = self.head(torch.cat([c1, self.fp_dropout(c1)]), torch.cat([c4, self.fp_dropout(c4)]))
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
            return logits.chunk(2)
        return F.interpolate(self.head(c1, c4), size=(h, w), mode="bilinear", align_corners=True)
