"""SimSeg's released checkpoints (muyangyi/SimSeg `simseg.vit-s.pth`, `simseg.vit-b.pth`) -> a semiseg checkpoint
of models/simseg.py's `SimSeg`, ready for zero-shot `eval` / `infer` / `gen-pseudo --model checkpoint`.

The file is `{'state_dict', 'optimizer', 'meta'[, 'scaler']}`; `meta.torch_version` is a
`torch.torch_version.TorchVersion`, the one class allow-listed for `weights_only=True` (nothing else is).
`module.` prefixes (DDP) are stripped. Keys (specs/checked_against_originals.md, SimSeg):

    image_encoder.model.model.<timm ViT>            -> image_encoder.<same>
    text_encoder.model.model.<HF BertModel>         -> text_encoder.<same>
    image_projection.linear.weight [512, 384|768]   -> image_projection.weight
    text_projection.linear.weight [512, 768]        -> text_projection.weight
    loss.temperature                                -> temperature (tau itself)
    text_encoder.model.model.embeddings.position_ids   dropped after checking it is arange (a buffer in the
                                                       transformers it pinned)
    ...pooler.* / image_encoder...head.*               dropped if present (unused by SimSeg's forward)

The position table is resized once to the `simseg.image_size` grid (288 / 16 = 18; bicubic, CLS kept), as
SimSeg's evaluation does on load. The architecture comes from the shapes (ViT width, depth and patch; BERT width,
depth, MLP and vocabulary size; heads = width / 64, as in ViT-S/B and BERT-base), the recipe (`--recipe`,
default simseg-vit-s-voc or simseg-vit-b-voc by width) gives the dataset and the zero-shot settings. The BERT
vocabulary is not in the file: `--tokenizer DIR` (the bert-base-uncased folder, or its vocab.txt) is stored in
the checkpoint (`vocab`), so evaluation needs no folder.
"""
from __future__ import annotations

import re

import torch

from semiseg_cli.convert.common import Converted, check_and_report, unwrap_state_dict
from semiseg_cli.errors import UserError

TARGET_KIND = ""
IMAGE, TEXT = "image_encoder.model.model.", "text_encoder.model.model."
RENAME = {"image_projection.linear.weight": "image_projection.weight",
          "text_projection.linear.weight": "text_projection.weight", "loss.temperature": "temperature"}
RECIPES = {384: "simseg-vit-s-voc", 768: "simseg-vit-b-voc"}  # ViT width -> the default recipe
TIMM_NAMES = {384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}
HEAD_DIM = 64


def read_checkpoint(src: str) -> dict:
    """The state dict of a released file, read with weights_only=True and TorchVersion (its `meta`) allowed."""
    from torch.torch_version import TorchVersion

    from semiseg_cli.io import load_file

    with torch.serialization.safe_globals([TorchVersion]):
        return unwrap_state_dict(load_file(src), src)


def _blocks(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def infer_arch(source: dict, src: str) -> dict:
    """The `simseg.*` architecture keys (and model.backbone) from a prefix-stripped state dict's shapes."""
    need = [IMAGE + "patch_embed.proj.weight", TEXT + "embeddings.word_embeddings.weight",
            TEXT + "encoder.layer.0.intermediate.dense.weight", "image_projection.linear.weight"]
    for key in need:
        if key not in source:
            raise UserError(f"{src}: not a SimSeg checkpoint (no {key})")
    patch = source[IMAGE + "patch_embed.proj.weight"]
    width, words = patch.shape[0], source[TEXT + "embeddings.word_embeddings.weight"]
    if patch.shape[-1] != 16:
        raise UserError(f"{src}: a ViT with {patch.shape[-1]}-pixel patches; SimSeg's are 16")
    return {"model.backbone": TIMM_NAMES.get(width, "vit_small_patch16_224"),
            "simseg.vit_depth": _blocks(source, re.escape(IMAGE) + r"blocks\.(\d+)\."), "simseg.vit_width": width,
            "simseg.vit_heads": width // HEAD_DIM,
            "simseg.text_layers": _blocks(source, re.escape(TEXT) + r"encoder\.layer\.(\d+)\."),
            "simseg.text_width": words.shape[1], "simseg.text_heads": words.shape[1] // HEAD_DIM,
            "simseg.text_mlp": source[TEXT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            "simseg.vocab_size": words.shape[0], "simseg.embed_dim": source["image_projection.linear.weight"].shape[0]}


def rename(key: str) -> str | None:
    if key.startswith(IMAGE):
        return "image_encoder." + key[len(IMAGE):]
    if key.startswith(TEXT):
        return "text_encoder." + key[len(TEXT):]
    return RENAME.get(key)


def convert(fmt: str, src: str, backbone: str | None = None, recipe: str | None = None, sets=(),
            tokenizer: str | None = None) -> Converted:
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model
    from semiseg_cli.models.clip_vit import resize_pos_embed
    from semiseg_cli.data.text import read_vocab, token_count

    if backbone is not None:
        raise UserError("--backbone does not apply to the simseg format (the architecture is read from the file)")
    if tokenizer is None:
        raise UserError("simseg needs --tokenizer DIR: the bert-base-uncased tokenizer folder (or its vocab.txt); "
                        "the checkpoint does not hold the vocabulary")
    raw = read_checkpoint(src)
    source = {k.removeprefix("module."): v for k, v in raw.items()}
    if len(source) != len(raw):
        raise UserError(f"{src}: keys with and without the `module.` prefix collide")
    arch = infer_arch(source, src)
    recipe = recipe or RECIPES.get(arch["simseg.vit_width"], RECIPES[384])
    cfg = load_config(recipe, [*sets, *(f"{k}={v}" for k, v in arch.items())])
    if cfg["model"]["name"] != "simseg":
        raise UserError(f"simseg converts SimSeg models; recipe {recipe} has model.name {cfg['model']['name']!r} "
                        "(use simseg-vit-s-voc or simseg-vit-b-voc)")
    vocab = read_vocab(tokenizer)
    n_words = token_count(vocab)
    if n_words != arch["simseg.vocab_size"]:
        raise UserError(f"{tokenizer}: {n_words} tokens, but the checkpoint's BERT has {arch['simseg.vocab_size']}: "
                        "pass the tokenizer it was trained with (bert-base-uncased)")

    grid = cfg["simseg"]["image_size"] // 16
    mapping, converted, reasons = [], {}, {}
    for old, v in raw.items():
        key = old.removeprefix("module.")
        if key == TEXT + "embeddings.position_ids":
            if not torch.equal(v.reshape(-1).long(), torch.arange(v.numel())):
                raise UserError(f"{src}: {old} is not 0, 1, 2, ...: BERT's position ids were changed")
            mapping.append((old, None))
            reasons[old] = "BERT's position ids (arange, checked; transformers rebuilds them)"
            continue
        if key.startswith(TEXT + "pooler.") or key.startswith(IMAGE + "head."):
            mapping.append((old, None))
            reasons[old] = "unused by SimSeg's forward (BERT pooler / timm classifier)"
            continue
        new = rename(key)
        if new is None:
            continue  # reported as unused by check_and_report
        if new == "image_encoder.pos_embed":
            g = round((v.shape[1] - 1) ** 0.5)  # a square grid + the CLS row
            if v.dim() != 3 or g * g != v.shape[1] - 1:
                raise UserError(f"{src}: {old} has shape {tuple(v.shape)}, not [1, 1 + g*g, width]")
            v = resize_pos_embed(v, (g, g), (grid, grid))
        mapping.append((old, new))
        converted[new] = v.float()
    converted["vocab"] = torch.frombuffer(bytearray(vocab), dtype=torch.uint8).clone()
    with torch.device("meta"):  # names and shapes only
        reference = build_model(cfg, load_weights=False).state_dict()
    reference.pop("vocab")  # its length is the file's (the placeholder is empty)
    target = (f"SimSeg ViT width {arch['simseg.vit_width']} x {arch['simseg.vit_depth']}, BERT width "
              f"{arch['simseg.text_width']} x {arch['simseg.text_layers']} ({recipe})")
    check_and_report(mapping, raw, {k: v for k, v in converted.items() if k != "vocab"}, reference, target)
    return Converted(converted, mapping, target, reasons, config=cfg)
