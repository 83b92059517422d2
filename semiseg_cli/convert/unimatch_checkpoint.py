"""Trained DeepLabV3+ checkpoints of UniMatch, FixMatch, PrevMatch and SemiOVS -> a semiseg checkpoint.

Their training scripts save `{"model": model.state_dict(), "optimizer", "epoch", "previous_best"}` as
`latest.pth` / `best.pth` with the model wrapped in DDP, so every key starts with `module.`
(specs/checked_against_originals.md, UniMatch-family checkpoints). Their DeepLabV3+ is the one of
models/deeplabv3plus.py under other names:

    backbone.*                      backbone.*   (ResNet deep stem conv1.{0,1,3,4,6}, bn1, layer1..4: timm's
                                                  resnet50s / resnet101s names; no fc)
    head.b0.{0,1}                   head.aspp.branches.0.{0,1}       1x1 conv + BN
    head.b{1,2,3}.{0,1}             head.aspp.branches.{1,2,3}.{0,1} atrous 6 / 12 / 18 + BN
    head.b4.gap.{1,2}               head.aspp.branches.4.conv.{0,1}  image pooling conv + BN
    head.project.{0,1}              head.aspp.project.{0,1}
    reduce.{0,1}                    head.reduce.{0,1}                c1 -> 48
    fuse.{0,1} / fuse.{3,4}         head.fuse.0.{0,1} / head.fuse.1.{0,1}
    classifier.*                    head.classifier.*

The recipe (`--recipe`, e.g. unimatch-voc-92) gives the architecture and the dataset; the result holds the
weights and that resolved config, so `eval`, `infer` and `gen-pseudo --model checkpoint` take it directly.

COCO's Xception-65 checkpoints (recipes unimatch-coco-*, `model.backbone: xception65_unimatch`) convert by
the same table: models/xception.py is UniMatch's Xception under UniMatch's names (backbone.conv1, bn1, conv2,
bn2, block1..20 with skip/skipbn and sepconvK.{depthwise,bn1,pointwise,bn2}, conv3..5). timm's xception65 has
the same 792 tensors but computes another function (c1 before its ReLU, undilated exit flow at output stride
16, ReLU on the middle-flow skips, BN eps 1e-5; models/xception.py), so a recipe with timm's `xception65` is
refused for these files rather than renamed.
"""
from __future__ import annotations

import re

from semiseg_cli.convert.common import Converted, check_and_report, load_state_dict
from semiseg_cli.errors import UserError

TARGET_KIND = ""  # the summary names the model and recipe
XCEPTION_BACKBONE = "xception65_unimatch"
XCEPTION_OTHER = ("this is UniMatch's Xception-65, which is not timm's xception65 under other names (c1 before its "
                  "ReLU, undilated exit flow, ReLU on the middle-flow skips, BN eps 1e-5): convert it with a recipe "
                  "whose model.backbone is xception65_unimatch (the unimatch-coco-* recipes), e.g. --set "
                  "model.backbone=xception65_unimatch")
XCEPTION_KEY = re.compile(r"^backbone\.(block\d+|conv[345])\.")  # UniMatch's Xception names, e.g. backbone.block1.skip
RENAMES = [
    (r"^backbone\.", "backbone."),
    (r"^head\.b([0-3])\.", r"head.aspp.branches.\1."),
    (r"^head\.b4\.gap\.1\.", "head.aspp.branches.4.conv.0."),
    (r"^head\.b4\.gap\.2\.", "head.aspp.branches.4.conv.1."),
    (r"^head\.project\.", "head.aspp.project."),
    (r"^reduce\.", "head.reduce."),
    (r"^fuse\.0\.", "head.fuse.0.0."),
    (r"^fuse\.1\.", "head.fuse.0.1."),
    (r"^fuse\.3\.", "head.fuse.1.0."),
    (r"^fuse\.4\.", "head.fuse.1.1."),
    (r"^classifier\.", "head.classifier."),
]


def rename(key: str) -> str | None:
    key = key.removeprefix("module.")
    for pattern, new in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, new, key)
    return None


def convert(fmt: str, src: str, backbone: str | None, recipe: str | None = None, sets=()) -> Converted:
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    if recipe is None:
        raise UserError("unimatch-checkpoint needs --recipe NAME: the recipe the checkpoint was trained with "
                        "(e.g. unimatch-voc-92), which gives its architecture and dataset")
    cfg = load_config(recipe, [*sets, *([f"model.backbone={backbone}"] if backbone else [])])
    if cfg["model"]["name"] != "deeplabv3plus":
        raise UserError(f"unimatch-checkpoint converts DeepLabV3+ models; recipe {recipe} has model.name "
                        f"{cfg['model']['name']!r}")
    source = load_state_dict(src)
    if cfg["model"]["backbone"] != XCEPTION_BACKBONE and any(XCEPTION_KEY.match(k.removeprefix("module."))
                                                             for k in source):
        raise UserError(f"{src}: {XCEPTION_OTHER}")
    reference = build_model(cfg, load_weights=False).state_dict()
    mapping = [(k, rename(k)) for k in source]
    unknown = [k for k, new in mapping if new is None]
    if unknown:
        raise UserError(f"{src}: {len(unknown)} keys are not UniMatch DeepLabV3+ names (e.g. {unknown[0]}); "
                        "is this a UniMatch-family checkpoint?")
    converted = {new: source[old] for old, new in mapping}
    target = f"DeepLabV3+ {cfg['model']['backbone']}, {cfg['dataset']['num_classes']} classes ({recipe})"
    check_and_report(mapping, source, converted, reference, target)
    return Converted(converted, mapping, target, config=cfg)
