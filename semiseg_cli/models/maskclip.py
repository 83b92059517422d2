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

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.facts import IGNORE_INDEX
from semiseg_cli.errors import UserError
from semiseg_cli.models.clip_vit import MaskClipViT, clip_renorm
from semiseg_cli.models.text_embeddings import max_per_class

LOGIT_SCALE = 100.0  # CLIP's learned temperature, fixed at 100 in the released models


def dense_logits(encoder: MaskClipViT, text: torch.Tensor, class_index: torch.Tensor, num_classes: int,
                 images: torch.Tensor, pd_thresh: float = 0.0, ks_thresh: float = 0.0) -> torch.Tensor:
    """MaskCLIP class logits [B, K, H, W] at the images' size: 100 x the cosine of the dense CLIP features with
    the text embeddings, max over each class's concepts, upsampled (bilinear, align_corners=False) to the
    patch-padded input and cropped to it, as mmseg does.

    Args:
        encoder: the frozen CLIP ViT (its `dense` output: [B, E, h, w], unit vectors).
        text: unit text embeddings [M, E], one per concept; class_index: [M], the class of each row.
        num_classes: K.
        images: [B, 3, H, W], normalised as the encoder expects.
        pd_thresh, ks_thresh: MaskCLIP's prompt denoising and key smoothing (`refine`); 0 = off (released).
    """
    out = encoder(images, keys=ks_thresh > 0)
    sim = max_per_class(torch.einsum("bchw,nc->bnhw", out["dense"].float(), text), class_index, num_classes)
    if pd_thresh > 0 or ks_thresh > 0:
        sim = refine(sim, out.get("keys"), pd_thresh, ks_thresh)
    h, w = images.shape[-2:]
    p = encoder.patch
    sim = F.interpolate(sim, size=(sim.shape[-2] * p, sim.shape[-1] * p), mode="bilinear", align_corners=False)
    return LOGIT_SCALE * sim[..., :h, :w]


def refine(logits: torch.Tensor, keys: torch.Tensor | None, pd_thresh: float, ks_thresh: float) -> torch.Tensor:
    """MaskCLIP's test-time refinement of the low-resolution cosine logits O [B, K, h, w]
    (`MaskClipHead.refine_output`, specs/simseg.md §4.4), prompt denoising first:

    PD: a class whose softmax(100 O) is below pd_thresh at every position gets O = -100 everywhere.
    KS: O <- softmax(100 O); where a position's max probability < ks_thresh its vector becomes W O,
        W = k^ k^T over positions, k^ = the last block's keys (after out_proj) L2-normalised over positions
        (dim=1, as the released code does; the paper's wording suggests per key vector).
    With KS the result is the refined map, not cosines (it can go negative); its argmax is MaskCLIP's.
    """
    b, k, h, w = logits.shape
    if pd_thresh > 0:
        peak = (LOGIT_SCALE * logits).softmax(1).flatten(2).amax(-1)               # [B, K]
        logits = logits.masked_fill((peak < pd_thresh)[..., None, None], -100.0)
    if ks_thresh > 0:
        prob = (LOGIT_SCALE * logits).softmax(1).flatten(2)                        # [B, K, hw]
        kn = F.normalize(keys.float(), p=2, dim=1)                                 # [B, hw, C]
        smoothed = torch.einsum("bij,bkj->bki", kn @ kn.transpose(1, 2), prob)     # (W O) per position
        low = prob.amax(1, keepdim=True) < ks_thresh
        logits = torch.where(low, smoothed, prob).view(b, k, h, w)
    return logits


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
        clip_input: renormalise the input to CLIP's mean/std (CLIP's setting); the mmseg port MaskCLIP's
            numbers come from feeds ImageNet-normalised images (the default).
        pd_thresh, ks_thresh: prompt denoising / key smoothing (`refine`; off as released).
    """

    def __init__(self, encoder: MaskClipViT, text: torch.Tensor, class_index: torch.Tensor, num_classes: int,
                 clip_input: bool = False, pd_thresh: float = 0.0, ks_thresh: float = 0.0):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.register_buffer("text", text.float())
        self.register_buffer("class_index", class_index.long())
        self.num_classes, self.clip_input = num_classes, clip_input
        self.pd_thresh, self.ks_thresh = pd_thresh, ks_thresh

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # training-free: never in train mode
        return self

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> torch.Tensor:
        if need_fp:
            raise UserError("model.name=maskclip is training-free: it has no feature-perturbation stream")
        return dense_logits(self.encoder, self.text, self.class_index, self.num_classes,
                            clip_renorm(x) if self.clip_input else x, self.pd_thresh, self.ks_thresh)


def build_maskclip(cfg: dict) -> MaskCLIP:
    """MaskCLIP from `model.weights` (a converted CLIP file, `semiseg convert-weights openai-clip ...`) and the
    class text `model.class_text` (default: the dataset's class names; concept lists allowed), each name
    embedded with the 85-template prompt ensemble. Without weights: a random `model.backbone` ViT and random
    unit text (tests, CPU pipelines). `model.renorm_clip` feeds CLIP-normalised images; `model.vit_act` /
    `model.vit_ln_eps` give the mmseg port's exact GELU and eps 1e-6 (default) or CLIP's quick_gelu and 1e-5."""
    from semiseg_cli.models.semivl import embed_class_text, load_class_text, vit_arch

    m = cfg["model"]
    names = load_class_text(m["class_text"], cfg)
    if m["weights"]:
        return maskclip_from_weights(m, names)
    encoder = MaskClipViT(**vit_arch(m["backbone"]), img_size=cfg["train"]["crop_size"], act=m["vit_act"],
                          ln_eps=m["vit_ln_eps"], out_indices=())
    text, owner = embed_class_text(cfg, names, average=False, seed=0)
    return MaskCLIP(encoder, text, owner, len(names), m["renorm_clip"], m["maskclip_pd"], m["maskclip_ks"])


def maskclip_from_weights(m: dict, classes: list) -> MaskCLIP:
    """MaskCLIP from the converted CLIP file `m["weights"]` (the `model` config section gives the ViT
    settings, the input normalisation and PD/KS) for a nested class list, each name embedded with the
    85-template prompt ensemble."""
    from semiseg_cli.models.prompts import templates
    from semiseg_cli.models.text_embeddings import ensemble_embeddings

    if not Path(m["weights"]).is_file():
        raise UserError(f"{m['weights']}: model.weights file not found; make it with "
                        f"`semiseg convert-weights openai-clip ViT-B-16.pt {m['weights']}`")
    encoder = MaskClipViT.from_file(m["weights"], act=m["vit_act"], ln_eps=m["vit_ln_eps"], out_indices=())
    text, owner = ensemble_embeddings(m["weights"], classes, templates("maskclip"))
    return MaskCLIP(encoder, text, owner, len(classes), m["renorm_clip"], m["maskclip_pd"], m["maskclip_ks"])
