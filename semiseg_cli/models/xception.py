"""UniMatch's Xception-65 (`model/backbone/xception.py`, the COCO backbone of UniMatch / SemiVL's baselines),
written from its definition with its module names, so UniMatch's ImageNet `pretrained/xception.pth` and its
trained COCO checkpoints load by name.

It is not timm's `xception65` (the same 792 weight tensors, another function; convert/unimatch_checkpoint.py):
    - c1 (for the decoder) is block2's sepconv2 output *before* ReLU: UniMatch builds block2 without in-place
      ReLUs so that its later ReLU does not rectify the hooked tensor;
    - in the identity-skip blocks (4..19) sepconv1's ReLU runs in place on the block input, which is also the
      skip, so a block computes relu(x) + F(relu(x)) (timm: x + F(relu(x))); kept, the weights were trained so;
    - the exit flow (block20, conv3..5) is dilated by 16 // output_stride: 1 at output stride 16 (timm, like
      DeepLab's TF model, dilates it by 2);
    - BatchNorm momentum 0.0003 and eps 1e-5 (timm: eps 1e-3).
Each in-place effect is written out explicitly here (no in-place ops), so the function is the same in train
mode, under autograd and under torch.compile.

Interface for models/deeplabv3plus.py: forward(x) -> [c1 (256 ch, stride 4), c4 (2048 ch, stride 8 or 16)],
`feature_info.channels()` = [256, 2048].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.0003  # UniMatch's bn_mom


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM)


class SeparableConv2d(nn.Module):
    """Depthwise k x k + BN, pointwise 1x1 + BN. activate_first: ReLU before (the blocks); else ReLU after each
    BN (conv3..5)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, activate_first: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin, bias=False)
        self.bn1 = _bn(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.activate_first = activate_first

    def forward(self, x):
        if self.activate_first:
            x = F.relu(x)
        x = self.bn1(self.depthwise(x))
        if not self.activate_first:
            x = F.relu(x)
        x = self.bn2(self.pointwise(x))
        return x if self.activate_first else F.relu(x)


class Block(nn.Module):
    """Three separable convs (the last one strided) plus a skip: a strided 1x1 conv + BN when the shape
    changes, else the (rectified, see the module doc) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, grow_first: bool = True):
        super().__init__()
        self.identity = cin == cout and stride == 1
        if not self.identity:
            self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = _bn(cout)
        mid = cout if grow_first else cin
        self.sepconv1 = SeparableConv2d(cin, mid, dilation=dilation)
        self.sepconv2 = SeparableConv2d(mid, cout, dilation=dilation)
        self.sepconv3 = SeparableConv2d(cout, cout, stride=stride, dilation=dilation)

    def forward(self, x, hook: bool = False):
        # identity skip: UniMatch's in-place ReLU in sepconv1 rectifies the skip too
        skip = F.relu(x) if self.identity else self.skipbn(self.skip(x))
        h = self.sepconv2(self.sepconv1(x))
        out = self.sepconv3(h) + skip
        return (out, h) if hook else out


class _FeatureInfo:
    def __init__(self, channels):
        self._channels = list(channels)

    def channels(self):
        return list(self._channels)


class UniMatchXception(nn.Module):
    """UniMatch's Xception-65 for DeepLabV3+ (output stride 16 or 8)."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"UniMatch's Xception supports output stride 8 or 16, not {output_stride}")
        s2, s3 = (1, 1) if output_stride == 8 else (2, 1)  # strides of block3 and block20 (block2: always 2)
        rate = 16 // output_stride
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = _bn(32)
        self.conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
        self.bn2 = _bn(64)
        self.block1 = Block(64, 128, 2)
        self.block2 = Block(128, 256, 2)
        self.block3 = Block(256, 728, s2)
        for i in range(4, 20):
            setattr(self, f"block{i}", Block(728, 728, 1, rate))
        self.block20 = Block(728, 1024, s3, rate, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536, dilation=rate, activate_first=False)
        self.conv4 = SeparableConv2d(1536, 1536, dilation=rate, activate_first=False)
        self.conv5 = SeparableConv2d(1536, 2048, dilation=rate, activate_first=False)
        self.feature_info = _FeatureInfo([256, 2048])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.block1(x)
        x, c1 = self.block2(x, hook=True)  # c1: sepconv2's output, not rectified (block2 is not in place)
        for i in range(3, 21):
            x = getattr(self, f"block{i}")(x)
        return [c1, self.conv5(self.conv4(self.conv3(x)))]
