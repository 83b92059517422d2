"""Checkpoints: written atomically, read with `weights_only=True` (a file can hold tensors, not code)."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from semiseg_cli.errors import UserError


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`: a run killed at any
    moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_file(path: str | Path):
    """Load a torch file safely; unreadable or unsafe files are a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"{path}: refused to load: it holds Python objects, not only tensors ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch file ({first})") from None


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (best.pt / last.pt): a dict with at least `model` and `config`."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a semiseg checkpoint (no model/config inside); pass best.pt or last.pt of a run")
    return ckpt
