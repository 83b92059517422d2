"""MaskCLIP (Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP"; specs/simseg.md §4): training-free
dense labels from a frozen CLIP ViT.

The last block's value path (`MaskClipViT`, models/clip_vit.py) gives an L2-normalised CLIP embedding per
patch; its cosine similarity with each text embedding, max-aggregated over each class's concepts
(`text_embeddings.max_per_class`), upsampled bilinearly to the image and scaled by CLIP's logit scale 100, is
the class logit map. Labels are its argmax where softmax confidence >= a threshold (else 255).

Two users: SemiVL's dense CLIP guidance (methods/semivl.py: `dense_logits` + `labels` on the frozen guidance
encoder, fed the images as the SemiVL model's ViT sees them), and the model `model.name: maskclip` (its own
frozen encoder and class text buffers, CLIP-normalised input, no trainable parameter) that `eval`,
`infer` and `gen-pseudo` run like any other model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.facts import IGNORE_INDEX
from semiseg_cli.errors import UserError
from semiseg_cli.models.clip_vit import MaskClipViT, clip_renorm
from semiseg_cli.models.text_embeddings import max_per_class

LOGIT_SCALE = 100.0  # CLIP's learned temperature, fixed at 100 in the released models


def dense_logits(encoder: MaskClipViT, text: torch.Tensor, class_index: torch.Tensor, num_classes: int,
                 images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP class logits [B, K, H, W] at the images' size.

    Args:
        encoder: the frozen CLIP ViT (its `dense` output: [B, E, h, w], unit vectors).
        text: unit text embeddings [M, E], one per concept.
        class_index: [M], the class of each text row.
        num_classes: K.
        images: [B, 3, H, W], normalised as the encoder expects.
    """
    dense = encoder(images)["dense"].float()
    sim = max_per_class(torch.einsum("bchw,nc->bnhw", dense, text), class_index, num_classes)
    sim = F.interpolate(sim, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return LOGIT_SCALE * sim


def labels(logits: torch.Tensor, conf_thresh: float, ign: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax labels [B, H, W] of `logits`; IGNORE_INDEX where the softmax confidence < conf_thresh or
    `ign` marks padding."""
    conf, label = logits.softmax(1).max(1)
    drop = conf < conf_thresh
    if ign is not None:
        drop |= ign == IGNORE_INDEX
    return label.masked_fill(drop, IGNORE_INDEX)


class MaskCLIP(nn.Module):
    """A frozen CLIP ViT and class text: forward(x ImageNet-normalised [B,3,H,W]) -> logits [B,K,H,W].

    Args:
        encoder: a MaskClipViT (converted CLIP weights).
        text: unit text embeddings [M, E]; class_index: [M] the class of each row; num_classes: K.
        clip_input: renormalise the input to CLIP's mean/std (the encoder was trained on that).
    """

    def __init__(self, encoder: MaskClipViT, text: torch.Tensor, class_index: torch.Tensor, num_classes: int,
                 clip_input: bool = True):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.register_buffer("text", text.float())
        self.register_buffer("class_index", class_index.long())
        self.num_classes, self.clip_input = num_classes, clip_input

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # training-free: never in train mode
        return self

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> torch.Tensor:
        if need_fp:
            raise UserError("model.name=maskclip is training-free: it has no feature-perturbation stream")
        return dense_logits(self.encoder, self.text, self.class_index, self.num_classes,
                            clip_renorm(x) if self.clip_input else x)


def build_maskclip(cfg: dict) -> MaskCLIP:
    """MaskCLIP from `model.weights` (a converted CLIP file, `semiseg convert-weights openai-clip ...`) and
    the class text `model.class_text` (concept lists allowed). Without weights: a random `model.backbone`
    ViT and random unit text (tests, CPU pipelines)."""
    from semiseg_cli.models.semivl import embed_class_text, load_class_text, vit_arch

    m, k = cfg["model"], cfg["dataset"]["num_classes"]
    text, owner = embed_class_text(cfg, load_class_text(m["class_text"], cfg), average=False, seed=0)
    if m["weights"]:
        encoder = MaskClipViT.from_file(m["weights"], act=m["vit_act"], ln_eps=m["vit_ln_eps"], out_indices=())
    else:
        encoder = MaskClipViT(**vit_arch(m["backbone"]), img_size=cfg["train"]["crop_size"], act=m["vit_act"],
                              ln_eps=m["vit_ln_eps"], out_indices=())
    return MaskCLIP(encoder, text, owner, k)
