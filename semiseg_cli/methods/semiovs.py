"""SemiOVS (Shin et al., "Leveraging Out-of-Distribution Unlabeled Images: Semi-Supervised Semantic
Segmentation with an Open-Vocabulary Model", arXiv 2507.03302; specs/semiovs_sed.md §1.3): out-of-distribution
(OOD) unlabeled images, labelled offline by an open-vocabulary model (SED: `gen-pseudo --model sed --list`),
join the consistency branches of a base method (`ssl.ood_base`: unimatch | prevmatch | semivl), which this
module composes, not copies.

Per step, on top of the base's streams:
- the OOD weak views join the base's train-mode forward: [x; u_w; o_w] with feature perturbation (one BN batch);
- the OOD strong views get the *unmixed* in-distribution strong views pasted into the in-distribution boxes
  (o_s1 <- u_s1 in box1, o_s2 <- u_s2 in box2) and go through a third forward [o_s1; o_s2];
- OOD targets: outside the box the OVS label, always kept (confidence 1, no threshold), inside it the weak
  in-distribution label with its tau-filter; the FP branch on o_w learns the OVS label; padding ignored;
- L_ood = lambda (0.25 L_s1^ood + 0.25 L_s2^ood + 0.5 L_fp^ood) with lambda = ssl.ood_weight, and

    unimatch   L = [L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp + L_ood] / (2 + lambda)
    prevmatch  L = [... + lambda_t L_prev + L_ood] / (2 + lambda_t + lambda), the /(2 + lambda) form while the
               pool is empty; PrevMatch's guidance on in-distribution data only
    semivl     L = [L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp + L_ood] / (2 + lambda) + lambda_mc(t) L_mc, with
               lambda = 0.5 (hard-coded in the original) and MaskCLIP guidance on in-distribution data only.

The model's prediction on o_w is computed (it is part of the shared forward) but unused, as in the original.
The CutMix donor is the unlabeled_mix stream, an independently shuffled image with `ssl.mix_source:
shuffled` (the original's 1-GPU runs) or the same image in another augmentation (`same`).

Bug of the original fixed here: its OOD loader exists only in the single-process branch, so DDP runs crash
(NameError); here the OOD stream is a stream like the others and works under torchrun. The original also ends
an epoch at the shortest of its four loaders (an OOD list shorter than the unlabeled one cuts epochs and the
poly schedule short); here the OOD stream is tiled or visited through its own permutations (data/streams.py).
"""
from __future__ import annotations

import torch

from semiseg_cli.errors import UserError
from semiseg_cli.methods import prevmatch, semivl, unimatch
from semiseg_cli.methods.fixmatch import cutmix, mix_targets, unsup_ce

LOADERS = ("labeled", "unlabeled", "unlabeled_mix", "ood")
BASES = ("unimatch", "prevmatch", "semivl")  # = config CHOICES["ssl.ood_base"]


def make_state(cfg: dict, model, out, env):
    """The base method's state (PrevMatch's pool, SemiVL's guidance encoder), or None for UniMatch."""
    base = cfg["ssl"]["ood_base"]
    if base == "prevmatch":
        return prevmatch.make_state(cfg, model, out, env)
    if base == "semivl":
        return semivl.make_state(cfg, model, out, env)
    if cfg["model"]["name"] == "semivl":
        raise UserError("ssl.ood_base=unimatch trains DeepLabV3+-style models; for the CLIP ViT set ssl.ood_base=semivl")
    return None


def ood_terms(model, s: dict, batch: dict, loss_u=unsup_ce) -> dict:
    """The three OOD losses on the base's streams `s` (its weak-view labels and the o_w FP prediction)."""
    o_s1 = cutmix(batch["o_s1"], batch["u_s1"], batch["box1"])  # the unmixed in-distribution strong views
    o_s2 = cutmix(batch["o_s2"], batch["u_s2"], batch["box2"])
    pred_o_s1, pred_o_s2 = model(torch.cat([o_s1, o_s2])).chunk(2)
    ovs, ign_o = batch["o_y"], batch["o_ign"]
    keep_o = torch.ones_like(ovs, dtype=s["keep"].dtype)  # OVS pixels: confidence 1, always kept
    label1, keep1, ign1 = mix_targets(batch["box1"], ovs, keep_o, ign_o, s["label"], s["keep"], batch["ign"])
    label2, keep2, ign2 = mix_targets(batch["box2"], ovs, keep_o, ign_o, s["label"], s["keep"], batch["ign"])
    return {"loss_s1_ood": loss_u(pred_o_s1, label1, keep1, ign1), "loss_s2_ood": loss_u(pred_o_s2, label2, keep2, ign2),
            "loss_fp_ood": loss_u(s["pred_extra_fp"], ovs, keep_o, ign_o)}


def train_step(model, batch: dict, ctx) -> tuple:
    base, lam = ctx.cfg["ssl"]["ood_base"], ctx.cfg["ssl"]["ood_weight"]
    if base == "semivl":
        s = semivl.semivl_streams(model, batch, ctx, extra_weak=batch["o_w"])
        loss_u = semivl.pixelavg_ce if ctx.cfg["ssl"]["conf_mode"] == "pixelavg" else unsup_ce
    else:
        s = unimatch.streams(model, batch, ctx, extra_weak=batch["o_w"])
        loss_u = unsup_ce
    o = ood_terms(model, s, batch, loss_u)
    loss_ood = lam * unimatch.unlabeled_sum(o["loss_s1_ood"], o["loss_s2_ood"], o["loss_fp_ood"])
    loss_id = s["loss_x"] + unimatch.unlabeled_sum(s["loss_s1"], s["loss_s2"], s["loss_fp"])
    logs = {**unimatch.logs(s), "loss_ood": ((o["loss_s1_ood"] + o["loss_s2_ood"]) / 2).detach(),
            "loss_fp_ood": o["loss_fp_ood"].detach()}
    if base == "prevmatch":
        prev = prevmatch.prev_terms(s, batch, ctx)  # in-distribution data only
        if prev is not None:
            loss_prev, lam_t = prev
            return (loss_id + lam_t * loss_prev + loss_ood) / (2 + lam_t + lam), \
                {**logs, **prevmatch.prev_logs(loss_prev, ctx.state)}
    loss = (loss_id + loss_ood) / (2 + lam)
    if base == "semivl":
        loss_guide, guide_logs = semivl.guidance_terms(s, batch, ctx)  # in-distribution data only
        return loss + loss_guide, {**logs, **guide_logs}
    return loss, logs
