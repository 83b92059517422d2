"""UniMatch (Yang et al., CVPR 2023; specs/semivl_unimatch.md §1.2): FixMatch plus a second strong view
and a feature-perturbation (FP) stream on the weak view:

    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2

Three forward passes: eval-mode no-grad on the mix source u_w_mix, [x; u_w] with FP (the FP output of the
labeled half is discarded), and [u_s1; u_s2]. Both strong views are CutMixed with the mix batch (each with
its own box); the FP branch uses the unmixed weak-view pseudo-labels. `streams` returns every prediction
and target so that PrevMatch can add its terms on the same forward passes.
"""
from __future__ import annotations

import torch

from semiseg_cli.methods.fixmatch import (cutmix, kept_ratio, mix_targets, predict_eval_mode, threshold_filter,
                                          unsup_ce)
from semiseg_cli.methods.losses import labeled_loss

LOADERS = ("labeled", "unlabeled", "unlabeled_mix")


def streams(model, batch: dict, ctx, select=threshold_filter, loss_u=unsup_ce, extra_weak=None) -> dict:
    """The UniMatch forward passes and losses: predictions (pred_*), targets and the four loss terms.
    `select` picks the pseudo-labelled pixels (or weights them), `loss_u` is the unlabeled loss.
    `extra_weak`: more weak-view images that join the [x; u_w] forward (same BN batch, with FP); their
    predictions are returned as pred_extra / pred_extra_fp (SemiOVS's OOD images)."""
    label_mix, keep_mix = select(predict_eval_mode(model, batch["u_w_mix"]), batch["ign_mix"], ctx)
    u_s1 = cutmix(batch["u_s1"], batch["u_s1_mix"], batch["box1"])
    u_s2 = cutmix(batch["u_s2"], batch["u_s2_mix"], batch["box2"])

    n_x, n_u = batch["x"].shape[0], batch["u_w"].shape[0]
    weak = [batch["x"], batch["u_w"]] + ([extra_weak] if extra_weak is not None else [])
    preds, preds_fp = model(torch.cat(weak), need_fp=True)
    pred_x, pred_u_w, pred_extra = preds[:n_x], preds[n_x:n_x + n_u], preds[n_x + n_u:]
    pred_u_w_fp, pred_extra_fp = preds_fp[n_x:n_x + n_u], preds_fp[n_x + n_u:]
    pred_u_s1, pred_u_s2 = model(torch.cat([u_s1, u_s2])).chunk(2)

    ign = batch["ign"]
    label, keep = select(pred_u_w, ign, ctx)
    label1, keep1, ign1 = mix_targets(batch["box1"], label, keep, ign, label_mix, keep_mix, batch["ign_mix"])
    label2, keep2, ign2 = mix_targets(batch["box2"], label, keep, ign, label_mix, keep_mix, batch["ign_mix"])
    return {
        "pred_u_s1": pred_u_s1, "pred_u_s2": pred_u_s2, "pred_u_w_fp": pred_u_w_fp, "ign1": ign1, "ign2": ign2,
        "label": label, "keep": keep, "pred_extra": pred_extra, "pred_extra_fp": pred_extra_fp,
        "loss_x": labeled_loss(pred_x, batch["y"], ctx.cfg),
        "loss_s1": loss_u(pred_u_s1, label1, keep1, ign1),
        "loss_s2": loss_u(pred_u_s2, label2, keep2, ign2),
        "loss_fp": loss_u(pred_u_w_fp, label, keep, ign),
        "mask_ratio": kept_ratio(keep, ign),
    }


def unlabeled_sum(s1, s2, fp) -> torch.Tensor:
    """UniMatch's weighting of the three consistency terms (total unsupervised weight 1)."""
    return 0.25 * s1 + 0.25 * s2 + 0.5 * fp


def logs(s: dict) -> dict:
    return {"loss_x": s["loss_x"].detach(), "loss_s": ((s["loss_s1"] + s["loss_s2"]) / 2).detach(),
            "loss_fp": s["loss_fp"].detach(), "mask_ratio": s["mask_ratio"]}


def train_step(model, batch: dict, ctx, select=threshold_filter) -> tuple:
    s = streams(model, batch, ctx, select)
    loss = (s["loss_x"] + unlabeled_sum(s["loss_s1"], s["loss_s2"], s["loss_fp"])) / 2
    return loss, logs(s)
