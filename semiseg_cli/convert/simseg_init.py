"""The initial weights SimSeg's training starts from (specs/simseg.md §1.1: an ImageNet-21k timm ViT and
bert-base-uncased; SimSeg does not start from CLIP):

- `timm-vit`: a timm ViT state dict (torch file or `.safetensors`, e.g. the hub's
  `vit_small_patch16_224.augreg_in21k` / `vit_base_patch16_224.augreg_in21k`, what timm 0.6's `*_in21k` names
  load) -> the image tower (`model.weights` of a `model.name: simseg` config). The 21k-class `head` is dropped;
  the position table keeps its grid (the model resizes it to its own when loading, bicubic, CLS kept).
- `bert`: a Hugging Face BERT state dict (`pytorch_model.bin` or `model.safetensors` of bert-base-uncased, from
  BertForPreTraining: `bert.` prefix, `cls.*` heads) -> the text tower (`simseg.text_weights`). The pretraining
  heads and the pooler are dropped (SimSeg's BertModel has none), old `LayerNorm.gamma / beta` names become
  `weight / bias`, and `position_ids` (a buffer in older files) is checked to be 0..n-1 and dropped.

Each is checked against the tower built from the file's shapes: every key used, every shape equal.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from semiseg_cli.convert.common import Converted, check_and_report, unwrap_state_dict
from semiseg_cli.errors import UserError
from semiseg_cli.io import load_file

TARGET_KIND = ""
VIT_SIZES = {384: "small", 768: "base", 1024: "large"}  # timm's ViT name of a width


def read_any(src: str) -> dict:
    """A state dict from a torch file (weights_only) or a .safetensors file."""
    if str(src).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        if not Path(src).is_file():
            raise UserError(f"{src}: file not found")
        try:
            return unwrap_state_dict(load_safetensors(src), src)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{src}: not a readable safetensors file ({str(e).strip()[:160]})") from None
    return unwrap_state_dict(load_file(src), src)


def _count(source: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in source if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def convert_vit(src: str, backbone: str | None) -> Converted:
    import timm

    sd = read_any(src)
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight")
    if any(k not in sd for k in need):
        raise UserError(f"{src}: not a timm ViT state dict (no {next(k for k in need if k not in sd)})")
    width, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    if grid * grid + 1 != sd["pos_embed"].shape[1]:
        raise UserError(f"{src}: a position table of {sd['pos_embed'].shape[1]} tokens is not CLS + a square grid")
    depth = _count(sd, r"blocks\.(\d+)\.")
    heads = width // 64  # timm's ViT-S/B/L: 64 channels per head
    name = backbone or f"vit_{VIT_SIZES.get(width, 'small')}_patch{patch}_224"
    reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=grid * patch, patch_size=patch,
                                  embed_dim=width, depth=depth, num_heads=heads).state_dict()
    reasons = {k: "the ImageNet-21k classifier (SimSeg uses patch tokens)" for k in sd if k.startswith("head.")}
    mapping = [(k, None if k in reasons else k) for k in sd]
    converted = {new: sd[old] for old, new in mapping if new}
    check_and_report(mapping, sd, converted, reference, f"the image tower ({name}, {depth} blocks, width {width})")
    return Converted(converted, mapping, f"image tower {name} (grid {grid}x{grid})", reasons)


BERT_RENAME = ((".gamma", ".weight"), (".beta", ".bias"))


def convert_bert(src: str, backbone: str | None) -> Converted:
    from semiseg_cli.models.simseg import BERT_MAX_POSITIONS, transformers_module

    if backbone is not None:
        raise UserError("--backbone does not apply to the bert format (the sizes are read from the file)")
    sd = read_any(src)
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
    words = sd.get(prefix + "embeddings.word_embeddings.weight")
    if words is None:
        raise UserError(f"{src}: not a BERT state dict (no {prefix}embeddings.word_embeddings.weight)")
    mapping, reasons = [], {}
    for k in sd:
        new = k[len(prefix):] if k.startswith(prefix) else None
        if new is None or new.startswith("pooler.") or k.startswith("cls."):
            reasons[k] = "BERT's pretraining heads / pooler (SimSeg's BertModel has no pooling layer)"
            new = None
        elif new == "embeddings.position_ids":
            if not torch.equal(sd[k].reshape(-1).long(), torch.arange(sd[k].numel())):
                raise UserError(f"{src}: {k} is not 0..{sd[k].numel() - 1}")
            reasons[k], new = "a constant buffer (0..n-1)", None
        elif "LayerNorm" in new:
            for old_suffix, new_suffix in BERT_RENAME:
                if new.endswith(old_suffix):
                    new = new[: -len(old_suffix)] + new_suffix
        mapping.append((k, new))
    converted = {new: sd[old] for old, new in mapping if new}
    width = words.shape[1]
    layers = _count(converted, r"encoder\.layer\.(\d+)\.")
    mlp = converted["encoder.layer.0.intermediate.dense.weight"].shape[0] if layers else 4 * width
    tf = transformers_module()
    bert = tf.BertConfig(vocab_size=words.shape[0], hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=max(width // 64, 1), intermediate_size=mlp,
                         max_position_embeddings=converted["embeddings.position_embeddings.weight"].shape[0],
                         type_vocab_size=converted["embeddings.token_type_embeddings.weight"].shape[0])
    reference = {k: v for k, v in tf.BertModel(bert, add_pooling_layer=False).state_dict().items()
                 if not k.endswith("position_ids")}
    check_and_report(mapping, sd, converted, reference, f"the text tower (BERT, {layers} layers, width {width})")
    if bert.max_position_embeddings != BERT_MAX_POSITIONS:
        raise UserError(f"{src}: {bert.max_position_embeddings} positions; SimSeg's BERT has {BERT_MAX_POSITIONS}")
    return Converted(converted, mapping, f"text tower BERT ({layers} layers, width {width}, {words.shape[0]} tokens)",
                     reasons)


def convert(fmt: str, src: str, backbone: str | None = None) -> Converted:
    return convert_vit(src, backbone) if fmt == "timm-vit" else convert_bert(src, backbone)
