"""Training checkpoints (best.pt / last.pt): written with `io.save_atomic`, read with `weights_only=True`."""
from __future__ import annotations

from pathlib import Path

from semiseg_cli.errors import UserError
from semiseg_cli.io import load_file


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint: a dict with at least `model` and `config`."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a semiseg checkpoint (no model/config inside); pass best.pt or last.pt of a run")
    return ckpt
