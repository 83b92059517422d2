"""Training checkpoints (best.pt / last.pt): written with `io.save_atomic`, read with `weights_only=True`.

A checkpoint verifies itself on load: its "checksum" (io.state_checksum of the weights, written since
semiseg stores one; older files without it still load), finite floating weights, and a config of valid
values (config.check_stored; keys added to the schema since the file was written take their defaults).
Each failure is one line naming the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from semiseg_cli.errors import UserError
from semiseg_cli.io import key_mismatches, load_file, state_checksum


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint: a dict with at least `model` and `config`, verified (see the module doc)."""
    from semiseg_cli.config import check_stored

    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a semiseg checkpoint (no model/config inside); pass best.pt or last.pt of a run")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a semiseg checkpoint (its model is not a dict of tensors)")
    if "checksum" in ckpt and state_checksum(state) != ckpt["checksum"]:
        raise UserError(f"{path}: corrupted: checksum mismatch (the weights changed after they were saved); "
                        "use another copy or checkpoint (best.pt / last.pt) of the run")
    # the trainer never saves non-finite weights (it stops first), so these come from damage or another tool
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: weight {bad} holds NaN or Inf values; this checkpoint cannot be used")
    ckpt["config"] = check_stored(ckpt["config"], str(path))
    return ckpt


def check_fits(model: torch.nn.Module, state: dict, path: str | Path, what: str) -> None:
    """One line naming the first missing / unknown / reshaped key when `state` does not fit `model` (keys in
    the model's `free_shape_keys`, e.g. SimSeg's stored vocabulary, may have any shape)."""
    own, free = model.state_dict(), getattr(model, "free_shape_keys", ())
    problems = key_mismatches(own, {k: (own[k] if k in free and k in own else v) for k, v in state.items()})
    if problems:
        raise UserError(f"{path}: its weights do not fit {what}: {'; '.join(problems)}")


def model_from_checkpoint(path: str | Path, recipe: str | None = None, sets=()) -> tuple[dict, object]:
    """(config, model) of a checkpoint: its config with `recipe` / `sets` applied on top (e.g. a dataset.root
    that differs on this machine) and the model holding its weights, on the CPU."""
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    ckpt = load_checkpoint(path)
    cfg = load_config(recipe, list(sets), base=ckpt["config"])
    model = build_model(cfg, load_weights=False)  # the checkpoint holds every weight
    check_fits(model, ckpt["model"], path, "the configured model (did --recipe / --set change the model?)")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the configured model ({str(e).splitlines()[0]})") from None
    return cfg, model
