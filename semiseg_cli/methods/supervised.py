"""Supervised baseline: labeled images only (UniMatch's `supervised.py`)."""
from __future__ import annotations

from semiseg_cli.methods.losses import labeled_loss

LOADERS = ("labeled",)


def train_step(model, batch: dict, ctx) -> tuple:
    """L = CE(f(x), y) (or OHEM, see `train.labeled_loss`)."""
    loss = labeled_loss(model(batch["x"]), batch["y"], ctx.cfg)
    return loss, {"loss_x": loss.detach()}
