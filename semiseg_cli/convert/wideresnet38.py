"""The ImageNet WideResNet-38 of PSA / SLRNet (`ilsvrc-cls_rna-a1_cls1000_ep-0001.pth`, converted from MXNet
by PSA's `convert_mxnet_to_torch`) -> models/wideresnet38.py's `WideResNet38` (SLRNet's resnet38d).

The model keeps the names PSA's converter writes (`conv1a`, `b2` .. `b7`, `bn7`; `bn_branch2a`,
`conv_branch2a`, ...), so the rename table is the identity, plus stripping a DataParallel `module.` prefix and
dropping an ImageNet classifier should a file hold one (PSA's converter already drops MXNet's `linear1000`;
SLRNet's head replaces it). The file has 191 tensors and no BN `num_batches_tracked`: the counters are filled
with 0 (the stats are never updated, so the counters are never read). SLRNet loads the file with strict=False,
which would silently keep random weights for a renamed key; here every source key must be used or dropped with
a reason, and every key of the model must come from the file with its shape.
"""
from __future__ import annotations

import torch

from semiseg_cli.convert.common import Converted, check_and_report, load_state_dict
from semiseg_cli.errors import UserError

TARGET = "wideresnet38"
TARGET_KIND = ""
# top-level names an ImageNet classifier might have: MXNet's / PSA's, a torchvision-style or a 1x1-conv fc8
CLASSIFIERS = ("linear1000", "fc", "fc8", "fc1000", "classifier")
NUM_CLASSES = 1000


def is_classifier(key: str, v: torch.Tensor) -> bool:
    """A tensor of a 1000-class ImageNet classifier (its output dimension is 1000)."""
    return key.split(".")[0] in CLASSIFIERS and v.ndim >= 1 and v.shape[0] == NUM_CLASSES


def convert(fmt: str, src: str, backbone: str | None = None) -> Converted:
    from semiseg_cli.models.wideresnet38 import NUM_TENSORS, WideResNet38

    if backbone not in (None, TARGET):
        raise UserError(f"--backbone {backbone}: {fmt} converts to {TARGET} only")
    source = load_state_dict(src)
    with torch.device("meta"):  # only names and shapes are needed: skip initialising 105M weights
        reference = WideResNet38().state_dict()
    mapping, converted, reasons = [], {}, {}
    for old, v in source.items():
        key = old.removeprefix("module.")
        if is_classifier(key, v):
            mapping.append((old, None))
            reasons[old] = f"ImageNet classifier ({NUM_CLASSES} classes); SLRNet's head replaces it"
            continue
        mapping.append((old, key))
        converted[key] = v
    for k in reference:  # the file has none; never read, since the BNs never update their statistics
        if k.endswith("num_batches_tracked") and k not in converted:
            converted[k] = torch.zeros((), dtype=torch.long)
    check_and_report(mapping, source, converted, reference, f"SLRNet's WideResNet-38 ({TARGET}, {NUM_TENSORS} "
                     "weight tensors)")
    return Converted(converted, mapping, TARGET, reasons)
