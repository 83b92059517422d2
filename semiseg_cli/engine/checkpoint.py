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


def model_from_checkpoint(path: str | Path, recipe: str | None = None, sets=()) -> tuple[dict, object]:
    """(config, model) of a checkpoint: its config with `recipe` / `sets` applied on top (e.g. a dataset.root
    that differs on this machine) and the model holding its weights, on the CPU."""
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    ckpt = load_checkpoint(path)
    cfg = load_config(recipe, list(sets), base=ckpt["config"])
    model = build_model(cfg, load_weights=False)  # the checkpoint holds every weight
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the configured model ({str(e).splitlines()[0]})") from None
    return cfg, model
