"""SLRNet's released checkpoints (DesertsP/SLRNet: `checkpoint20.pth.tar` WSS, `checkpoint28` semi with image
labels, `checkpoint32` semi without) -> a semiseg checkpoint of models/slrnet.py's `SLRNet`.

Its trainers save `{'state_dict': model.module.state_dict(), 'epoch', 'optimizer'}` (no `module.` prefix; the
optimizer state is a plain torch SGD state dict, which `weights_only=True` reads). The state dict has 449
entries for WideResNet-38 (specs/checked_against_originals.md, SLRNet): 318 tensors of the model, every
BatchNorm with its `num_batches_tracked` (resnet38d's FixedBatchNorm2d and single_stage's _BatchNorm are both
nn.BatchNorm2d subclasses), plus copies the original registers twice and PAMR's constant kernels:

    backbone.*                             backbone.*        (WideResNet-38 under PSA's names, or a timm encoder)
    aspp.* shallow_mask.* fc8_skip.*       head.<same>       (ASPP aspp1..4 / global_avg_pool / conv1 / bn1; GCI
    fc8_x.* last_conv.* aux_head.*                            fc_deep / fc_skip / fc_cls: the same names here)
    factorization_reconstruction.*         head.cvlr.*       (transform1, transform2)
    newly_added.{0..8}.*                   dropped: the ModuleList [aspp, shallow_mask, sg, fc8_skip, fc8_x,
                                           last_conv, factorization_reconstruction, initialize_dictionary,
                                           aux_head] (sg and initialize_dictionary have no tensors)
    backbone.fixed_layers.{0..3}.*         dropped: resnet38d's ModuleList [conv1a, b2, b2_1, b2_2]
    _aff.aff_{x,m}.kernel [8,1,3,3],       dropped: PAMR's fixed shift kernels (buffers, not weights; the
    _aff.aff_std.kernel [9,1,3,3]          trainer's PAMR builds its own)

Each alias must equal its canonical tensor (then it is dropped); one that differs, or whose canonical key is
missing, is an error naming it. A file without any `num_batches_tracked` (saved by torch < 0.4.1) gets the
counters as 0: the BNs' momentum is fixed, so the counters are never read.

The variant comes from `last_conv`'s last conv: K-1 outputs (a constant background logit: WSS, or semi with
image labels) or K (the background predicted: semi without image labels), and must match the recipe's
`slrnet.variant`. The recipe (`--recipe`, required) gives the architecture and the dataset; DST holds the
weights and that resolved config, so `eval`, `infer` and `gen-pseudo --model checkpoint` take it directly.
"""
from __future__ import annotations

import re

import torch

from semiseg_cli.convert.common import Converted, check_and_report, load_state_dict
from semiseg_cli.errors import UserError

TARGET_KIND = ""  # the summary names the model and recipe
# the original's ModuleLists of modules registered a second time (index -> the canonical attribute)
NEWLY_ADDED = ("aspp", "shallow_mask", "sg", "fc8_skip", "fc8_x", "last_conv", "factorization_reconstruction",
               "initialize_dictionary", "aux_head")
FIXED_LAYERS = ("conv1a", "b2", "b2_1", "b2_2")
HEAD = ("aspp", "shallow_mask", "fc8_skip", "fc8_x", "last_conv", "aux_head")  # head.<same name>
PAMR_KERNELS = {"_aff.aff_x.kernel": (8, 1, 3, 3), "_aff.aff_m.kernel": (8, 1, 3, 3),
                "_aff.aff_std.kernel": (9, 1, 3, 3)}
# slrnet.variant -> the VOC recipe of that variant
VOC_RECIPES = {"wss": "slrnet-voc-wss", "semi_cls": "slrnet-voc-semi", "semi_nocls": "slrnet-voc-semi-nolabels"}
NEEDS_RECIPE = ("slrnet needs --recipe NAME, the recipe the checkpoint was trained with: slrnet-voc-wss "
                "(checkpoint20, WSS), slrnet-voc-semi (checkpoint28, semi with image labels) or "
                "slrnet-voc-semi-nolabels (checkpoint32, semi without image labels)")
_NEWLY = re.compile(r"^newly_added\.(\d+)\.(.+)$")
_FIXED = re.compile(r"^backbone\.fixed_layers\.(\d+)\.(.+)$")
_LAST_CONV = re.compile(r"^last_conv\.(\d+)\.weight$")


def alias_of(key: str) -> str | None:
    """The canonical key an alias copies (`newly_added.5.8.weight` -> `last_conv.8.weight`,
    `backbone.fixed_layers.1.conv_branch1.weight` -> `backbone.b2.conv_branch1.weight`); None: not an alias.
    An index outside the original's lists is not an alias (then an unknown key)."""
    for pattern, names, prefix in ((_NEWLY, NEWLY_ADDED, ""), (_FIXED, FIXED_LAYERS, "backbone.")):
        m = pattern.match(key)
        if m and int(m.group(1)) < len(names):
            return f"{prefix}{names[int(m.group(1))]}.{m.group(2)}"
    return None


def rename(key: str) -> str | None:
    """The target key of one of the original's canonical keys; None: not an SLRNet model key."""
    if key.startswith("backbone.") and not _FIXED.match(key):
        return key
    top, _, rest = key.partition(".")
    if not rest:
        return None
    if top in HEAD:
        return f"head.{key}"
    if top == "factorization_reconstruction":
        return f"head.cvlr.{rest}"
    return None


def file_variant(source: dict, num_classes: int, src) -> str:
    """"cls" (last_conv gives K-1 outputs: WSS / semi with image labels) or "nocls" (K: semi without)."""
    convs = [(int(m.group(1)), k) for k in source if (m := _LAST_CONV.match(k)) and source[k].ndim == 4]
    if not convs:
        raise UserError(f"{src}: no last_conv conv weights (last_conv.N.weight); is this an SLRNet checkpoint?")
    key = max(convs)[1]
    out = source[key].shape[0]
    if out == num_classes - 1:
        return "cls"
    if out == num_classes:
        return "nocls"
    raise UserError(f"{src}: {key} gives {out} outputs, but the recipe has {num_classes} classes (SLRNet's "
                    f"last_conv gives K-1 = {num_classes - 1} or K = {num_classes}); pick the recipe of its dataset")


def check_variant(found: str, cfg: dict, recipe: str, src, key_outputs: int) -> None:
    variant = cfg["slrnet"]["variant"]
    if (variant == "semi_nocls") == (found == "nocls"):
        return
    if found == "nocls":
        what = (f"SLRNet without image labels (last_conv gives K = {key_outputs} outputs: the background is "
                "predicted; slrnet.variant semi_nocls)")
        fits = f"--recipe {VOC_RECIPES['semi_nocls']} (or --set slrnet.variant=semi_nocls)"
    else:
        what = (f"SLRNet with image labels (last_conv gives K-1 = {key_outputs} outputs and a constant background; "
                "slrnet.variant wss or semi_cls)")
        fits = (f"--recipe {VOC_RECIPES['wss']} (WSS) or {VOC_RECIPES['semi_cls']} (semi with image labels), "
                "or --set slrnet.variant=wss")
    raise UserError(f"{src}: this is {what}, but recipe {recipe} has slrnet.variant {variant}: convert it with {fits}")


def convert(fmt: str, src: str, backbone: str | None, recipe: str | None = None, sets=()) -> Converted:
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    if recipe is None:
        raise UserError(NEEDS_RECIPE)
    cfg = load_config(recipe, [*sets, *([f"model.backbone={backbone}"] if backbone else [])])
    if cfg["model"]["name"] != "slrnet":
        raise UserError(f"slrnet converts SLRNet models; recipe {recipe} has model.name {cfg['model']['name']!r} "
                        "(use slrnet-voc-wss, slrnet-voc-semi or slrnet-voc-semi-nolabels)")
    raw = load_state_dict(src)
    source = {k.removeprefix("module."): v for k, v in raw.items()}
    if len(source) != len(raw):
        raise UserError(f"{src}: keys with and without the `module.` prefix collide")
    num_classes = cfg["dataset"]["num_classes"]
    found = file_variant(source, num_classes, src)
    check_variant(found, cfg, recipe, src, num_classes if found == "nocls" else num_classes - 1)
    if "backbone.conv1a.weight" in source and cfg["model"]["backbone"] != "wideresnet38":
        raise UserError(f"{src}: the checkpoint's encoder is WideResNet-38 (backbone.conv1a, b2 .. b7), but recipe "
                        f"{recipe} has model.backbone {cfg['model']['backbone']}: --set model.backbone=wideresnet38")

    mapping, converted, reasons = [], {}, {}
    for old, v in raw.items():
        key = old.removeprefix("module.")
        canonical = alias_of(key)
        if canonical is not None:
            if canonical not in source:
                raise UserError(f"{src}: {old} is an alias of {canonical}, which the file lacks")
            c = source[canonical]
            if v.shape != c.shape or v.dtype != c.dtype or not torch.equal(v, c):
                raise UserError(f"{src}: {old} differs from {canonical}, which it should copy (the original "
                                "registers that module twice); the file is inconsistent")
            mapping.append((old, None))
            reasons[old] = f"alias of {canonical} (equal; the original registers that module twice)"
            continue
        if key in PAMR_KERNELS:
            if tuple(v.shape) != PAMR_KERNELS[key]:
                raise UserError(f"{src}: {old} has shape {tuple(v.shape)}, PAMR's kernel has {PAMR_KERNELS[key]}")
            mapping.append((old, None))
            reasons[old] = "PAMR's fixed shift kernel (a constant buffer, not a weight; the trainer's PAMR has its own)"
            continue
        new = rename(key)
        if new is None:
            raise UserError(f"{src}: {old} is not an SLRNet key (expected backbone.*, {', '.join(HEAD)}, "
                            "factorization_reconstruction.*, the newly_added / fixed_layers aliases or _aff.*)")
        mapping.append((old, new))
        converted[new] = v

    with torch.device("meta"):  # only names and shapes: skip initialising (WideResNet-38: 105M weights)
        reference = build_model(cfg, load_weights=False).state_dict()
    if not any(k.endswith("num_batches_tracked") for k in converted):  # saved by torch < 0.4.1: never read
        for k, v in reference.items():
            if k.endswith("num_batches_tracked"):
                converted[k] = torch.zeros((), dtype=v.dtype)
    variant = cfg["slrnet"]["variant"]
    target = f"SLRNet {cfg['model']['backbone']}, {variant}, {num_classes} classes ({recipe})"
    check_and_report(mapping, raw, converted, reference, target)
    return Converted(converted, mapping, target, reasons, config=cfg)
