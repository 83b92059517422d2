"""PrevMatch (Shin et al., arXiv 2024; specs/semiovs_sed.md §3): UniMatch plus guidance from previous
best models.

Pool: whenever an evaluation improves the best mIoU, a frozen copy of the model joins the pool (FIFO, at
most ssl.prev_pool_size = 8). It is empty until the first improving evaluation; UniMatch's loss is used
until then.

Guidance per step: draw K uniformly from {1..ssl.prev_max_models} (3), pick min(K, pool) models without
replacement, weights w ~ Dirichlet(1, ..., 1); guidance logits = sum_i w_i f_i([u_w; u_w_mix]) (eval mode,
no gradient); softmax max/argmax -> (conf_prev, y_prev). The three UniMatch consistency terms are recomputed
against it (strong views against CutMix(y_prev, y_prev_mix), FP against y_prev) with threshold
ssl.prev_conf_thresh = 0.9:

    L_prev = lambda_t (0.25 L_s1^prev + 0.25 L_s2^prev + 0.5 L_fp^prev)
    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp + L_prev) / (2 + lambda_t)

lambda_t rises 0 -> 1 over the first half of training and falls back to 0 over the second (the original
steps it per epoch with e/40 and 1 - (e-40)/40 for 80 epochs; here per iteration, the same line).

Differences from the original: the pool is stored. Each member is a weights file in <run>/prev_models/
and the checkpoint lists them, so a resumed run has the same pool (the original loses it on restart). The
draw (K, models, weights) comes from a generator seeded by (seed, iteration), so it resumes exactly and is
the same on every process.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from semiseg_cli.io import load_file, save_atomic
from semiseg_cli.methods import unimatch
from semiseg_cli.methods.fixmatch import mix_targets, pseudo_label, unsup_ce

LOADERS = ("labeled", "unlabeled", "unlabeled_mix")
POOL_DIR = "prev_models"


def guidance_weight(iteration: int, total: int) -> float:
    """lambda_t: triangular 0 -> 1 (half-way) -> 0."""
    return 1.0 - abs(2.0 * iteration / total - 1.0)


class PrevModelPool:
    """The previous best models (frozen, eval mode) and their files in <run>/prev_models/."""

    def __init__(self, cfg: dict, model: torch.nn.Module, out: Path, env):
        self.cfg, self.out, self.env = cfg, Path(out), env
        self.template = model  # the live model: on resume, pool members are rebuilt as copies of it
        self.models: list[torch.nn.Module] = []
        self.files: list[str] = []
        self.stale: list[str] = []  # evicted files, deleted once a checkpoint no longer lists them

    @staticmethod
    def _frozen_copy(model: torch.nn.Module, state: dict | None = None) -> torch.nn.Module:
        m = copy.deepcopy(model)
        if state is not None:
            m.load_state_dict(state)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
            p.grad = None  # deepcopy copies the live model's gradients too
        return m

    def after_eval(self, model: torch.nn.Module, improved: bool, iteration: int) -> None:
        """Add a copy of `model` if the evaluation improved the best mIoU. Called before last.pt is saved,
        so files evicted now are deleted at the next call, when last.pt no longer lists them."""
        if self.env.is_main:
            for name in self.stale:
                (self.out / POOL_DIR / name).unlink(missing_ok=True)
        self.stale = []
        if not improved:
            return
        name = f"iter{iteration:08d}.pt"
        if self.env.is_main:
            (self.out / POOL_DIR).mkdir(exist_ok=True)
            save_atomic(model.state_dict(), self.out / POOL_DIR / name)
        self.models.append(self._frozen_copy(model))
        self.files.append(name)
        while len(self.models) > self.cfg["ssl"]["prev_pool_size"]:
            self.models.pop(0)
            self.stale.append(self.files.pop(0))

    def state_dict(self) -> dict:
        return {"files": list(self.files), "stale": list(self.stale)}

    def load_state_dict(self, state: dict) -> None:
        self.files, self.stale = list(state["files"]), list(state["stale"])
        self.models = [self._frozen_copy(self.template, load_file(self.out / POOL_DIR / f)) for f in self.files]

    def draw(self, iteration: int) -> tuple[list[int], list[float]]:
        """Indices of the models used at `iteration` and their Dirichlet(1, ..., 1) weights (sum 1)."""
        rng = random.Random(f"{self.cfg['train']['seed']}-prevmatch-{iteration}")
        k = rng.randint(1, self.cfg["ssl"]["prev_max_models"])
        picked = rng.sample(range(len(self.models)), min(k, len(self.models)))
        gammas = [rng.gammavariate(1.0, 1.0) for _ in picked]  # normalised Gamma(1) draws are Dirichlet(1)
        return picked, [g / sum(gammas) for g in gammas]

    @torch.no_grad()
    def guidance(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        """Dirichlet-weighted sum of the picked models' logits."""
        picked, weights = self.draw(iteration)
        return sum(w * self.models[i](images).float() for i, w in zip(picked, weights))


def make_state(cfg: dict, model, out, env) -> PrevModelPool:
    return PrevModelPool(cfg, model, out, env)


def prev_terms(s: dict, batch: dict, ctx) -> tuple[torch.Tensor, float] | None:
    """(L_prev, lambda_t) on UniMatch's forward passes `s`, or None while the pool is empty."""
    pool: PrevModelPool = ctx.state
    if not pool.models:
        return None
    n_u = batch["u_w"].shape[0]
    conf_p, label_p = pseudo_label(pool.guidance(torch.cat([batch["u_w"], batch["u_w_mix"]]), ctx.iteration))
    keep_p = conf_p >= ctx.cfg["ssl"]["prev_conf_thresh"]
    label, label_mix = label_p.split(n_u)
    keep, keep_mix = keep_p.split(n_u)
    ign, ign_mix = batch["ign"], batch["ign_mix"]
    label1, keep1, _ = mix_targets(batch["box1"], label, keep, ign, label_mix, keep_mix, ign_mix)
    label2, keep2, _ = mix_targets(batch["box2"], label, keep, ign, label_mix, keep_mix, ign_mix)
    loss_prev = unimatch.unlabeled_sum(unsup_ce(s["pred_u_s1"], label1, keep1, s["ign1"]),
                                       unsup_ce(s["pred_u_s2"], label2, keep2, s["ign2"]),
                                       unsup_ce(s["pred_u_w_fp"], label, keep, ign))
    return loss_prev, guidance_weight(ctx.iteration, ctx.total)


def prev_logs(loss_prev: torch.Tensor, pool: PrevModelPool) -> dict:
    return {"loss_prev": loss_prev.detach(), "prev_models": torch.tensor(float(len(pool.models)))}


def train_step(model, batch: dict, ctx) -> tuple:
    s = unimatch.streams(model, batch, ctx)
    loss_std = unimatch.unlabeled_sum(s["loss_s1"], s["loss_s2"], s["loss_fp"])
    prev = prev_terms(s, batch, ctx)
    if prev is None:
        return (s["loss_x"] + loss_std) / 2, unimatch.logs(s)
    loss_prev, lam = prev
    loss = (s["loss_x"] + loss_std + lam * loss_prev) / (2 + lam)
    return loss, {**unimatch.logs(s), **prev_logs(loss_prev, ctx.state)}
