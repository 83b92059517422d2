"""A small UNet trained from scratch: the CPU model of the synthetic recipes.

Encoder (`backbone`): a stride-2 stem and four double-conv (3x3 conv-BN-ReLU x2) stages at strides 2, 4, 8,
16 with widths w, 2w, 4w, 4w; decoder (`head`): three up stages (bilinear x2, concat with the skip,
double conv) back to stride 2, a 1x1 classifier and a bilinear resize to the input. With w = 16 it has
0.2 M parameters and costs a few percent of an ImageNet encoder per image, so the semi-supervised methods
can be trained for thousands of iterations on two CPU cores; its full-resolution skips learn the
synthetic shapes from scratch where a stride-16 DeepLabV3+ needs ImageNet weights.

UniMatch's feature perturbation (`need_fp`) drops channels (Dropout2d 0.5) of every encoder feature the
decoder reads, as DeepLabV3+ does for its c1 and c4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([double_conv(w, w), double_conv(w, 2 * w), double_conv(2 * w, 4 * w),
                                     double_conv(4 * w, 4 * w)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stages[0](self.stem(x))]
        for stage in self.stages[1:]:
            feats.append(stage(F.max_pool2d(feats[-1], 2, ceil_mode=True)))
        return feats  # strides 2, 4, 8, 16


class Decoder(nn.Module):
    def __init__(self, w: int, num_classes: int):
        super().__init__()
        self.ups = nn.ModuleList([double_conv(8 * w, 2 * w), double_conv(4 * w, w), double_conv(2 * w, w)])
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return self.classifier(x)


class UNet(nn.Module):
    """Small UNet.

    Args:
        num_classes: K.
        width: w, the width of the first stage (16 for the synthetic recipes).

    Example:
        >>> UNet(6)(torch.zeros(2, 3, 96, 80)).shape
        torch.Size([2, 6, 96, 80])
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.backbone = Encoder(width)
        self.head = Decoder(width, num_classes)

    def forward(self, x: torch.Tensor, need_fp: bool = False):
        size = x.shape[-2:]
        feats = self.backbone(x)
        if need_fp:
            feats = [torch.cat([f, F.dropout2d(f, 0.5, self.training)]) for f in feats]
        logits = F.interpolate(self.head(feats), size=size, mode="bilinear", align_corners=False)
        return logits.chunk(2) if need_fp else logits
