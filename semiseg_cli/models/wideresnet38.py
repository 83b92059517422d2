"""WideResNet-38 ("resnet38d"): the backbone of SLRNet (Pan et al., "Learning Self-Supervised Low-Rank Network
for Single-Stage Weakly and Semi-Supervised Semantic Segmentation", IJCV 2022; DesertsP/SLRNet,
`models/backbones/resnet38d.py`), inherited from PSA (Ahn & Kwak, "Learning Pixel-level Semantic Affinity with
Image-level Supervision", CVPR 2018) and 1-stage-wseg; the network is Wu et al.'s "model A1" (ademxapp),
whose ImageNet weights `ilsvrc-cls_rna-a1_cls1000_ep-0001.params` PSA converted from MXNet to
`ilsvrc-cls_rna-a1_cls1000_ep-0001.pth`.

Written from the definition (not copied), with the module names of PSA's converter so that the ImageNet file
loads by name (`semiseg convert-weights wideresnet38`, convert/wideresnet38.py: the rename table is the
identity): `conv1a`, `b2`, `b2_1`, `b2_2`, `b3`..`b3_2`, `b4`..`b4_5`, `b5`..`b5_2`, `b6`, `b7`, `bn7`; inside a
block `bn_branch2a`, `conv_branch2a`, `bn_branch2b1`, `conv_branch2b1`, `conv_branch1` (the 1x1 shortcut, only
where the shape changes), and in the bottlenecks b6/b7 also `bn_branch2b2`, `conv_branch2b2`.

Layout (pre-activation residual units; input normalised with the ImageNet mean/std):
    conv1a  3x3, 3 -> 64, stride 1, no BN/ReLU after it (the next unit's bn_branch2a does that)
    b2      3 units 3x3+3x3, 128 ch, the first with stride 2        (stride 2)
    b3      3 units, 256 ch, stride 2                               (stride 4)  -> conv3 (256 ch, raw sum)
    b4      6 units, 512 ch, stride 2                               (stride 8)
    b5      3 units, mid 512 / out 1024, dilation 2 (b5's first conv: dilation 1)
    b6      bottleneck 1x1 (512) -> 3x3 (1024, dilation 4) -> 1x1 (2048), Dropout2d(0.3)
    b7      bottleneck 1x1 (1024) -> 3x3 (2048, dilation 4) -> 1x1 (4096), Dropout2d(0.5)
    bn7 + ReLU                                                      (stride 8)  -> conv6 (4096 ch)
In a unit the shortcut 1x1 conv (`conv_branch1`) takes relu(bn_branch2a(x)), the same pre-activated tensor the
residual branch starts from; an identity shortcut takes x itself. The bottlenecks always have `conv_branch1`
(their channel count changes). The dropouts sit after the ReLUs that precede the bottleneck's 3x3 and last 1x1
convs, as in SLRNet's resnet38d.

As SLRNet trains it: every BatchNorm of the backbone is "fixed" (always the running statistics, never updated;
the ImageNet statistics suit batches of 1-8 crops better than the batch's own) with frozen affine parameters,
and conv1a, b2, b2_1, b2_2 (SLRNet's `fixed_layers`) are frozen (requires_grad False). SLRNet registers those
four also as a ModuleList `fixed_layers`, which duplicates their weights in its state dict under
`backbone.fixed_layers.*`; here they are a tuple of names, so the state dict holds each tensor once: 191
tensors besides the BN `num_batches_tracked` counters, the count of the ImageNet file.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NUM_TENSORS = 191  # tensors in ilsvrc-cls_rna-a1_cls1000_ep-0001.pth (no num_batches_tracked, no classifier)
FROZEN = ("conv1a", "b2", "b2_1", "b2_2")  # SLRNet's backbone.fixed_layers


class FixedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm that always normalises with its running statistics and never updates them, whatever its
    mode (SLRNet's FixedBatchNorm2d: the ImageNet statistics are kept for the whole training)."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


class ResBlock(nn.Module):
    """Pre-activation unit: bn_branch2a + ReLU, then 3x3 (stride, first_dilation) -> bn_branch2b1 + ReLU -> 3x3
    (dilation); shortcut identity, or a 1x1 strided conv of the pre-activated input when the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = FixedBatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = FixedBatchNorm2d(mid)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        # the ImageNet file has conv_branch1 exactly where input and output shapes differ
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x):
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck (b6, b7): bn_branch2a + ReLU, 1x1 (cout/4) -> bn_branch2b1 + ReLU + dropout ->
    3x3 dilated (cout/2) -> bn_branch2b2 + ReLU + dropout -> 1x1 (cout); shortcut: 1x1 conv of the
    pre-activated input."""

    def __init__(self, cin: int, cout: int, dilation: int, dropout: float):
        super().__init__()
        self.bn_branch2a = FixedBatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
        self.bn_branch2b1 = FixedBatchNorm2d(cout // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = FixedBatchNorm2d(cout // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y


class WideResNet38(nn.Module):
    """SLRNet's resnet38d. forward(x) -> (conv3, conv6): the b3 group's output (256 ch, stride 4) and
    relu(bn7(b7 output)) (4096 ch, stride 8). Backbone BNs stay fixed in every mode; FROZEN layers and BN
    affine parameters have requires_grad False."""

    out_channels = (256, 4096)
    strides = (4, 8)

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)
        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)
        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)
        # from here on dilation instead of stride: output stride 8 (b5's first 3x3 still at dilation 1)
        self.b5 = ResBlock(512, 512, 1024, dilation=2, first_dilation=1)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = BottleneckBlock(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = FixedBatchNorm2d(4096)
        self._freeze()

    def _freeze(self) -> None:
        for name in FROZEN:
            getattr(self, name).requires_grad_(False)
        for m in self.modules():
            if isinstance(m, _BatchNorm):
                m.requires_grad_(False)

    def train(self, mode: bool = True):
        """As nn.Module.train, but every BatchNorm stays in eval mode (also after SyncBatchNorm conversion,
        which replaces FixedBatchNorm2d by a plain SyncBatchNorm that only eval mode keeps fixed), and the frozen
        parameters are frozen again (as SLRNet's train() does)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        self._freeze()
        return self

    def forward(self, x):
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2"):
            x = getattr(self, name)(x)
        conv3 = x
        for name in ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5", "b5", "b5_1", "b5_2", "b6", "b7"):
            x = getattr(self, name)(x)
        return conv3, F.relu(self.bn7(x))
