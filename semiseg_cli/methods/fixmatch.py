"""FixMatch for segmentation, as in UniMatch's `fixmatch.py` (specs/semivl_unimatch.md §1.2 without the FP
stream and with one strong view): L = (L_x + L_s) / 2.

Pseudo-labels come from the weak view in the same train-mode forward; the strong view is CutMixed with a
second unlabeled batch whose pseudo-labels come from an eval-mode, no-grad forward. The pieces here
(`cutmix`, `pseudo_label`, `threshold_filter`, `mix_targets`, `unsup_ce`) are reused by UniMatch and the
methods built on it. Tensor names follow the legend in semiseg_cli/data/streams.py.

Which pseudo-labelled pixels are learned from is a filter `select(logits, ign, ctx) -> (label, keep)`:
`threshold_filter` (softmax confidence >= ssl.conf_thresh) by default; S4MC passes its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg_cli.methods.losses import IGNORE, labeled_loss

LOADERS = ("labeled", "unlabeled", "unlabeled_mix")


def cutmix(dst: torch.Tensor, src: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste `src` into `dst` where box == 1 (box [B, H, W]; images [B, C, H, W] or maps [B, H, W])."""
    m = box.bool()
    return torch.where(m.unsqueeze(1) if dst.dim() == 4 else m, src, dst)


@torch.no_grad()
def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, class) of softmax(logits) per pixel, without gradient."""
    return logits.detach().float().softmax(1).max(1)


def threshold_filter(logits: torch.Tensor, ign: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's filter: (argmax class, confidence >= ssl.conf_thresh). Padding is masked by the loss."""
    conf, label = pseudo_label(logits)
    return label, conf >= ctx.cfg["ssl"]["conf_thresh"]


@torch.no_grad()
def predict_eval_mode(model, images: torch.Tensor) -> torch.Tensor:
    """Logits of a no-grad forward with BN in eval mode (UniMatch's pseudo-labels for the mix source)."""
    model.eval()
    logits = model(images)
    model.train()
    return logits


def mix_targets(box, label, conf, ign, label_mix, conf_mix, ign_mix):
    """Targets of a CutMixed strong view: the mix source's label, confidence (or keep mask) and ignore
    mask inside box, the batch's own outside it."""
    return cutmix(label, label_mix, box), cutmix(conf, conf_mix, box), cutmix(ign, ign_mix, box)


def unsup_ce(logits, label, keep, ign) -> torch.Tensor:
    """UniMatch's unlabeled loss: CE on kept pixels (confidence >= tau) that are not padding, summed and
    divided by the number of non-padded pixels (not by the kept ones). `keep` may also be a float weight."""
    loss = F.cross_entropy(logits, label, reduction="none")
    valid = ign != IGNORE
    return (loss * keep * valid).sum() / valid.sum().clamp(min=1)


def kept_ratio(keep, ign) -> torch.Tensor:
    """Fraction of pixels whose pseudo-label is learned from (logged as mask_ratio; the mean weight when
    `keep` is a float weight)."""
    return (keep * (ign != IGNORE)).float().mean()


def train_step(model, batch: dict, ctx, select=threshold_filter) -> tuple:
    label_mix, keep_mix = select(predict_eval_mode(model, batch["u_w_mix"]), batch["ign_mix"], ctx)
    u_s1 = cutmix(batch["u_s1"], batch["u_s1_mix"], batch["box1"])

    n_x = batch["x"].shape[0]
    pred_x, pred_u_w = model(torch.cat([batch["x"], batch["u_w"]])).split([n_x, batch["u_w"].shape[0]])
    pred_u_s1 = model(u_s1)
    label, keep = select(pred_u_w, batch["ign"], ctx)
    label1, keep1, ign1 = mix_targets(batch["box1"], label, keep, batch["ign"], label_mix, keep_mix, batch["ign_mix"])

    loss_x = labeled_loss(pred_x, batch["y"], ctx.cfg)
    loss_s = unsup_ce(pred_u_s1, label1, keep1, ign1)
    loss = (loss_x + loss_s) / 2
    return loss, {"loss_x": loss_x.detach(), "loss_s": loss_s.detach(), "mask_ratio": kept_ratio(keep, batch["ign"])}
