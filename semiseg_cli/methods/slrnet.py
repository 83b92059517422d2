"""SLRNet: single-stage weakly (image labels) and semi-supervised segmentation with cross-view low-rank
factorisation (Pan et al., IJCV 2022; specs/slrnet_s4mc.md A2, the original's models/slrnet*.py and
tools/train_voc_{wss,semi}.py).

One stream, `tagged` (data/dataset.py `tagged_items`): RandomResizedCrop 0.9-1.0, flip, colour jitter; image
labels y (multi-hot over the K-1 foreground classes, from the masks unless dataset.image_labels names a file);
in the semi variants the pixel-labelled images (the split's labeled list, read slrnet.oversample times) carry
their masks. View 2 = view 1 resized by slrnet.view_scale (bilinear, align_corners); both go through one
`model(x, x2)` call (models/slrnet.py). With m¹, m² the two views' masks (view 2's on view 1's grid) and Z¹, Z²
their CVLR codes:

    L_cls  = MLSM(s¹, y) + MLSM(s², y) + a MLSM(s_aux, y)               (multi-label soft margin, a = 0.4)
    L_mask = mean |m¹_c - m²_c| y_c                                      (foreground c; not label-masked in semi_nocls)
    L_code = mean |maxmask(Z¹) - maxmask(Z²)|                            (each pixel's winning code only)
    pseudo = pseudo_masks(up(PAMR(image, (m¹ + m²) / 2)) * y)            (no gradient; GT for pixel-labelled images)
    L_seg  = BCE(logits¹) + BCE(logits²) + a BCE(aux logits)             (class-balanced CE, `balanced_ce`)

    wss:   L = c0 mean L_cls + c1 L_mask + c2 L_code + [epoch > pretrain] c3 mean L_seg
    semi:  L_cls of a pixel-labelled image is replaced by its L_seg (semi_nocls: L_cls = 0 otherwise);
           L = c0 mean L_cls + c1 L_mask + c2 L_code + c3 mean_{pixel-labelled} L_seg + [epoch > pretrain] c3 mean L_seg

with (c0, c1, c2, c3) = slrnet.loss_coeff. The original's mean over the pixel-labelled images is NaN in a batch
without one (about 4 % of its iterations); here that term is 0. semi_nocls predicts the background as a
class, raises it to the power slrnet.pamr_bg_pow (3) before PAMR, and drops the class-count gate
(`balanced_ce`); slrnet.class_gate=false drops it in the other variants too (the synthetic recipes: their
images hold 2-3 shapes each, and a pseudo mask holding every one of them is rare early on, so the gate passed
1 image in 64 and the segmentation loss never started; VOC images mostly hold one class).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg_cli.data.transforms import denormalize
from semiseg_cli.methods.losses import IGNORE
from semiseg_cli.models.slrnet_layers import pamr

LOADERS = ("tagged",)
VARIANTS = ("wss", "semi_cls", "semi_nocls")


@torch.no_grad()
def pseudo_masks(masks: torch.Tensor, cutoff_top: float = 0.6, cutoff_low: float = 0.2, bg_factor: float = 0.7) -> torch.Tensor:
    """One-hot pseudo masks [B, K, H, W] of refined masks: class c where m_c > max(f_c max_pixels(m_c), cutoff_low)
    with f = bg_factor for the background and cutoff_top otherwise; pixels with no class or several get none
    (all zero = ignored)."""
    flat = masks.flatten(2)
    factor = torch.full((masks.shape[1], 1), cutoff_top, device=masks.device, dtype=masks.dtype)
    factor[0] = bg_factor
    thresh = (flat.max(-1, keepdim=True)[0] * factor).clamp(min=cutoff_low)
    onehot = (flat > thresh).to(masks.dtype)
    onehot = onehot * (onehot.sum(1, keepdim=True) == 1)
    return onehot.view_as(masks)


def onehot_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A mask [B, H, W] (255 = ignore) as one-hot [B, K, H, W] with ignored pixels all zero."""
    valid = y != IGNORE
    return F.one_hot(torch.where(valid, y, 0), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]


def balanced_ce(logits: torch.Tensor, pseudo: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """SLRNet's class-balanced CE per image [B]: logits upsampled to the pseudo masks (bilinear, align_corners);
    each pixel's CE weighted by (N - N_c) / (1 + N) (N_c its class's pseudo pixels, N all of them) and averaged
    over all H x W pixels (unlabelled ones count 0). With `labels` [B, K-1], an image counts only when its pseudo
    mask holds exactly its labels' classes + background (faithful: an image whose crop cut a class out, or whose
    pseudo mask has no background, is dropped)."""
    logits = F.interpolate(logits.float(), size=pseudo.shape[-2:], mode="bilinear", align_corners=True)
    target = torch.where(pseudo.sum(1) > 0, pseudo.argmax(1), IGNORE)
    per_class = pseudo.flatten(2).sum(-1)                                  # [B, K]
    total = per_class.sum(-1, keepdim=True)
    weight = (pseudo * ((total - per_class) / (1 + total))[:, :, None, None]).sum(1)
    loss = (F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none") * weight).flatten(1).mean(-1)
    if labels is not None:
        loss = loss * ((per_class > 0).sum(-1) == labels.sum(-1) + 1).to(loss.dtype)
    return loss


def max_mask(codes: torch.Tensor) -> torch.Tensor:
    """Each pixel's largest code kept, the others zeroed (gradient only through the winner)."""
    return codes * (codes == codes.max(1, keepdim=True)[0])


@torch.no_grad()
def make_pseudo(out: dict, x: torch.Tensor, labels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Pseudo masks at the crop size from the two views' masks: PAMR on their mean (image resized to the
    masks' grid), upsampled, foreground channels of absent classes zeroed (with image labels), `pseudo_masks`."""
    s = cfg["slrnet"]
    nocls = s["variant"] == "semi_nocls"
    masks = (out["masks1"].float() + out["masks2"].float()) / 2
    if s["pamr_bg_pow"] != 1:
        masks = torch.cat([masks[:, :1] ** s["pamr_bg_pow"], masks[:, 1:]], 1)
    image = F.interpolate(denormalize(x), size=masks.shape[-2:], mode="bilinear", align_corners=True)
    refined = pamr(image, masks, s["pamr_iters"], tuple(s["pamr_dilations"]))
    refined = F.interpolate(refined, size=x.shape[-2:], mode="bilinear", align_corners=True)
    if not nocls:
        refined[:, 1:] *= labels[:, :, None, None]
    return pseudo_masks(refined, s["cutoff_top"], s["cutoff_low"], s["bg_factor"])


def train_step(model, batch: dict, ctx) -> tuple:
    cfg, s = ctx.cfg, ctx.cfg["slrnet"]
    c0, c1, c2, c3 = s["loss_coeff"]
    a, nocls = s["aux_weight"], s["variant"] == "semi_nocls"
    x, labels, has_mask = batch["t"], batch["cls"].float(), batch["has_mask"].bool()
    h, w = x.shape[-2:]
    x2 = F.interpolate(x, size=(int(h * s["view_scale"]), int(w * s["view_scale"])), mode="bilinear", align_corners=True)
    out = model(x, x2)

    pseudo = make_pseudo(out, x, labels, cfg)
    if s["variant"] != "wss":  # pixel-labelled images learn from their masks
        gt = onehot_labels(batch["t_y"], pseudo.shape[1])
        pseudo = torch.where(has_mask[:, None, None, None], gt, pseudo)
    gate = labels if s["class_gate"] and not nocls else None
    seg = (balanced_ce(out["logits1"], pseudo, gate) + balanced_ce(out["logits2"], pseudo, gate)
           + a * balanced_ce(out["aux_logits"], pseudo, gate))

    if nocls:
        cls = torch.zeros_like(seg)
    else:
        cls = sum(wt * F.multilabel_soft_margin_loss(out[k].float(), labels, reduction="none")
                  for k, wt in (("cls1", 1.0), ("cls2", 1.0), ("cls_aux", a)))
    diff = (out["masks1"][:, 1:] - out["masks2"][:, 1:]).abs()
    loss_mask = (diff if nocls else diff * labels[:, :, None, None]).mean()
    loss_code = (max_mask(out["codes1"]) - max_mask(out["codes2"])).abs().mean()

    late = ctx.epoch > s["pretrain_epochs"]
    if s["variant"] == "wss":
        loss = c0 * cls.mean() + c1 * loss_mask + c2 * loss_code + (c3 * seg.mean() if late else 0)
    else:
        cls = torch.where(has_mask, seg, cls)
        n = has_mask.sum()
        seg_labeled = (seg * has_mask).sum() / n.clamp(min=1)  # 0, not NaN, in a batch without pixel labels
        loss = c0 * cls.mean() + c1 * loss_mask + c2 * loss_code + c3 * seg_labeled + (c3 * seg.mean() if late else 0)
    logs = {"loss_cls": cls.mean().detach(), "loss_seg": seg.mean().detach(), "loss_mask": loss_mask.detach(),
            "loss_code": loss_code.detach(), "mask_ratio": (pseudo.sum(1) > 0).float().mean()}
    return loss, logs
