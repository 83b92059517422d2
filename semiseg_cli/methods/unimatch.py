"""UniMatch (Yang et al., CVPR 2023; specs/semivl_unimatch.md §1.2): FixMatch plus a second strong view
and a feature-perturbation (FP) stream on the weak view:

    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2

Three forward passes: eval-mode no-grad on the mix source u_w_mix, [x; u_w] with FP (the FP output of the
labeled half is discarded), and [u_s1; u_s2]. Both strong views are CutMixed with the mix batch (each with
its own box); the FP branch uses the unmixed weak-view pseudo-labels.
"""
from __future__ import annotations

import torch

from semiseg_cli.methods.fixmatch import cutmix, mix_targets, predict_eval_mode, pseudo_label, unsup_ce
from semiseg_cli.methods.losses import labeled_loss

LOADERS = ("labeled", "unlabeled", "unlabeled_mix")


def train_step(model, batch: dict, ctx) -> tuple:
    tau = ctx.cfg["ssl"]["conf_thresh"]
    conf_mix, label_mix = pseudo_label(predict_eval_mode(model, batch["u_w_mix"]))
    u_s1 = cutmix(batch["u_s1"], batch["u_s1_mix"], batch["box1"])
    u_s2 = cutmix(batch["u_s2"], batch["u_s2_mix"], batch["box2"])

    n_x, n_u = batch["x"].shape[0], batch["u_w"].shape[0]
    preds, preds_fp = model(torch.cat([batch["x"], batch["u_w"]]), need_fp=True)
    pred_x, pred_u_w = preds.split([n_x, n_u])
    pred_u_w_fp = preds_fp[n_x:]
    pred_u_s1, pred_u_s2 = model(torch.cat([u_s1, u_s2])).chunk(2)

    conf, label = pseudo_label(pred_u_w)
    ign = batch["ign"]
    label1, conf1, ign1 = mix_targets(batch["box1"], label, conf, ign, label_mix, conf_mix, batch["ign_mix"])
    label2, conf2, ign2 = mix_targets(batch["box2"], label, conf, ign, label_mix, conf_mix, batch["ign_mix"])

    loss_x = labeled_loss(pred_x, batch["y"], ctx.cfg)
    loss_s1 = unsup_ce(pred_u_s1, label1, conf1, ign1, tau)
    loss_s2 = unsup_ce(pred_u_s2, label2, conf2, ign2, tau)
    loss_fp = unsup_ce(pred_u_w_fp, label, conf, ign, tau)
    loss = (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
    mask_ratio = ((conf >= tau) & (ign != 255)).float().mean()
    return loss, {"loss_x": loss_x.detach(), "loss_s": ((loss_s1 + loss_s2) / 2).detach(),
                  "loss_fp": loss_fp.detach(), "mask_ratio": mask_ratio}
