"""Losses shared by the methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg_cli.data.facts import IGNORE_INDEX as IGNORE


def ohem_ce(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 200000) -> torch.Tensor:
    """UniMatch's OHEM cross-entropy (specs/semivl_unimatch.md §1.4): keep the pixels whose ground-truth
    probability is <= max(thresh, the min_kept-th smallest such probability); plain CE when fewer than
    min_kept pixels are valid."""
    valid = target != IGNORE
    n_valid = int(valid.sum())  # one sync per labeled batch; OHEM needs the count on the host
    if n_valid < min_kept:
        return F.cross_entropy(logits, target, ignore_index=IGNORE)
    with torch.no_grad():
        prob = logits.float().softmax(1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        gt_prob = prob[valid]
        kth = gt_prob.kthvalue(min(min_kept, n_valid)).values
        threshold = torch.clamp(kth, min=thresh)
        keep = valid & (prob <= threshold)
    return F.cross_entropy(logits, torch.where(keep, target, IGNORE), ignore_index=IGNORE)


def labeled_loss(logits: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The supervised loss on labeled images: CE (ignore 255) or OHEM, per `train.labeled_loss`."""
    tr = cfg["train"]
    if tr["labeled_loss"] == "ohem":
        return ohem_ce(logits, y, tr["ohem_thresh"], tr["ohem_min_kept"])
    return F.cross_entropy(logits, y, ignore_index=IGNORE)
