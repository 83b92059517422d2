"""The ground floor for files: safe loading, atomic writes, index PNGs and the one key/shape check.

Every layer (data, models, methods, convert, engine, pseudo) reads and writes through these, so there is
one temp-name rule, one `weights_only=True` loader and one "every key present, every shape equal" check.
Nothing here imports from the rest of the package except `errors`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from semiseg_cli.errors import UserError


def temp_path(path: Path) -> Path:
    """The temp name of an atomic write to `path`: hidden, in the same folder (so the rename is atomic),
    with the pid (two processes never share one)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


# The names `temp_path` makes: ".<name>.tmp<pid>".
_TEMP_NAME = re.compile(r"^\..+\.tmp\d+$")


def leftover_temps(folder: Path) -> list[Path]:
    """Temp files of atomic writes in `folder` and its direct subfolders (a run's prev_models/) whose
    process was killed mid-write. Only safe to delete while no other process writes there (a run folder
    under its lock)."""
    found = [*Path(folder).glob(".*.tmp*"), *Path(folder).glob("*/.*.tmp*")]
    return sorted(p for p in found if p.is_file() and _TEMP_NAME.match(p.name))


def write_atomic(path: str | Path, write: Callable) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename over `path`: a process killed
    at any moment leaves the old file or the new one, never a torn one. The temp file is removed on error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_atomic(obj, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (see `write_atomic`)."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def load_file(path: str | Path):
    """Load a torch file with `weights_only=True`; a missing, unreadable or unsafe file is a UserError
    naming the file."""
    import torch

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


def state_checksum(state: dict) -> str:
    """sha256 over a state dict's tensors in sorted key order: each key, dtype, shape and its bytes (in
    logical, contiguous order, so a channels_last copy hashes like the original). Stored as a checkpoint's
    "checksum" to detect weights corrupted after saving."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype (bf16 too)
    return h.hexdigest()


def save_index_png(mask: np.ndarray, path: str | Path, palette: np.ndarray | None = None) -> None:
    """Write a uint8 index mask [H, W] as PNG atomically: mode 'P' with `palette` ([256, 3] uint8; the
    indices are unchanged, viewers show colours), else mode 'L'."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
    if palette is not None:
        im.putpalette(np.asarray(palette, np.uint8).tobytes())  # 'L' -> 'P', indices unchanged
    write_atomic(path, lambda f: im.save(f, format="PNG"))


def key_mismatches(expected: dict, given: dict, extra_allowed: bool = False, kind: str = "") -> list[str]:
    """What keeps `given` (name -> tensor or shape) from fitting `expected`: "N missing <kind>keys (e.g. k)",
    "N unknown <kind>keys", "N shape mismatches"; empty when every key is present with its shape.
    With `extra_allowed`, keys of `given` that `expected` lacks are not counted."""
    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = sorted(set(expected) - set(given))
    extra = [] if extra_allowed else sorted(set(given) - set(expected))
    wrong = [k for k in expected if k in given and shape(given[k]) != shape(expected[k])]
    return [f"{len(keys)} {label} (e.g. {keys[0]})" for label, keys in
            ((f"missing {kind}keys", missing), (f"unknown {kind}keys", extra), ("shape mismatches", wrong)) if keys]
