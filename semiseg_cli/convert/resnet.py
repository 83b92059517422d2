"""ResNets: torchvision checkpoints, UniMatch's `pretrained/resnet101.pth` (deep stem) and mmseg's
ResNet-v1c (`open-mmlab://resnet101_v1c`, SemiVL's Cityscapes stem) -> timm.

timm's ResNet uses torchvision's names (conv1, bn1, layerN.M.convK, downsample.0/1, fc), and its deep
stem `resnet*s` uses UniMatch's (conv1.0/1/3/4/6 + bn1), so the rename table is the identity plus
stripping a DataParallel `module.` prefix. The target model follows from the file: a deep stem gives
`resnet{50,101,152}s` (stem widths 64) or `resnet*c` (widths 32, v1c), a plain stem
`resnet{18,34,50,101,152}`. mmseg names its deep stem `stem.0/1/3/4/6/7` (conv, BN, conv, BN, conv, BN):
stem.N -> conv1.N, and its last BN stem.7 -> bn1.
"""
from __future__ import annotations

import timm

from semiseg_cli.convert.common import Converted, check_and_report, load_state_dict
from semiseg_cli.errors import UserError

DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def infer_backbone(sd: dict) -> str:
    """timm name of the ResNet a state dict describes (layer depths, bottleneck or basic, stem)."""
    blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(k.endswith("conv3.weight") for k in sd if k.startswith("layer1."))
    depth = 50 if blocks == (3, 4, 6, 3) and bottleneck else DEPTHS.get(blocks)
    if depth is None:
        raise UserError(f"not a ResNet state dict (blocks per stage {blocks})")
    if "conv1.0.weight" not in sd:
        return f"resnet{depth}"
    return f"resnet{depth}{'c' if sd['conv1.0.weight'].shape[0] == 32 else 's'}"


def rename(fmt: str, key: str) -> str:
    key = key.removeprefix("module.")
    if fmt == "mmseg-resnet":
        key = key.removeprefix("backbone.")
        if key.startswith("stem.7."):
            return "bn1." + key.removeprefix("stem.7.")
        if key.startswith("stem."):
            return "conv1." + key.removeprefix("stem.")
    return key


def convert(fmt: str, src: str, backbone: str | None) -> Converted:
    source = load_state_dict(src)
    sd = {rename(fmt, k): v for k, v in source.items()}
    target = backbone or infer_backbone(sd)
    reference = timm.create_model(target, pretrained=False).state_dict()
    mapping, converted, reasons = [], {}, {}
    for old, v in source.items():
        new = rename(fmt, old)
        if new.startswith("fc.") and (new not in reference or reference[new].shape != v.shape):
            mapping.append((old, None))
            reasons[old] = "classifier of another size"
            continue
        mapping.append((old, new))
        converted[new] = v
    # UniMatch's files may lack the ImageNet classifier; the segmentation backbone never uses it
    for k in ("fc.weight", "fc.bias"):
        if k not in converted and k in reference:
            converted[k] = reference[k]
    check_and_report(mapping, source, converted, reference, f"timm {target}")
    return Converted(converted, mapping, target, reasons)
