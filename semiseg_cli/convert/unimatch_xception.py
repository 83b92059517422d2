"""UniMatch's ImageNet Xception-65 (`pretrained/xception.pth`) -> the backbone of `model.backbone:
xception65_unimatch` (models/xception.py, which keeps UniMatch's module names).

UniMatch loads the file by dropping every key containing 'itr', 'tmp' or 'track' (e.g. BN
num_batches_tracked) and updating the model's own state dict with the rest. Here the rest must be exactly the
model's weights (every key used, every shape equal; UniMatch would silently keep a random tensor for a key the
file lacks); the dropped keys are listed with that reason, and num_batches_tracked counters start at 0 as
UniMatch's do. A `module.` prefix is stripped.
"""
from __future__ import annotations

import torch

from semiseg_cli.convert.common import Converted, check_and_report, load_state_dict
from semiseg_cli.errors import UserError

TARGET = "xception65_unimatch"
TARGET_KIND = ""
DROPPED = ("itr", "tmp", "track")  # UniMatch's loader filter (model/backbone/xception.py)


def convert(fmt: str, src: str, backbone: str | None = None) -> Converted:
    from semiseg_cli.models.xception import UniMatchXception

    if backbone not in (None, TARGET):
        raise UserError(f"--backbone {backbone}: unimatch-xception converts to {TARGET} only")
    source = load_state_dict(src)
    reference = UniMatchXception(16).state_dict()
    mapping, converted, reasons = [], {}, {}
    for old, v in source.items():
        key = old.removeprefix("module.")
        if any(d in key for d in DROPPED):
            mapping.append((old, None))
            reasons[old] = "UniMatch's loader drops keys with 'itr', 'tmp' or 'track'"
            continue
        mapping.append((old, key))
        converted[key] = v
    for k, ref in reference.items():  # counters UniMatch keeps at their initial 0
        if k.endswith("num_batches_tracked") and k not in converted:
            converted[k] = torch.zeros_like(ref)
    check_and_report(mapping, source, converted, reference, f"UniMatch's Xception-65 ({TARGET})")
    return Converted(converted, mapping, TARGET, reasons)
