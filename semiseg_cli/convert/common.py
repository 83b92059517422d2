"""What every format module of `convert/` shares: the result type, the every-key-used check, the mapping
printout and reading a checkpoint's state dict. The registry (`convert/__init__.py`) sits above these
modules; they never import it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from semiseg_cli.console import err
from semiseg_cli.errors import UserError
from semiseg_cli.io import key_mismatches, load_file


@dataclass
class Converted:
    """What a format's `convert()` returns.

    state: the converted state dict; mapping: (source key, target key or None = dropped) pairs;
    reasons: why each dropped key was dropped; target: the model it fits (for the summary line);
    sidecars: suffix -> state dict written beside DST as `<DST stem><suffix>` (None: remove a stale one),
    e.g. the CLIP text tower `<DST stem>.text.pt`;
    config: a resolved config: DST is then a semiseg checkpoint {"model": state, "config": config} that
    `eval`, `infer` and `gen-pseudo` take (a trained model), not a weights file.
    """
    state: dict
    mapping: list
    target: str
    reasons: dict = field(default_factory=dict)
    sidecars: dict = field(default_factory=dict)
    config: dict | None = None


def check_and_report(mapping: list[tuple[str, str | None]], source: dict, converted: dict, reference: dict,
                     what: str) -> None:
    """Every source key used (or dropped with a reason), the reference's keys exactly, every shape equal."""
    unused = sorted(set(source) - {old for old, _ in mapping})
    parts = [f"{len(unused)} unused source keys (e.g. {unused[0]})"] if unused else []
    parts += key_mismatches(reference, converted, kind="target ")
    if parts:
        raise UserError(f"the file does not convert to {what}: " + ", ".join(parts))


def print_mapping(mapping: list[tuple[str, str | None]], reasons: dict[str, str]) -> None:
    """Every `old -> new` pair on stderr (detectron2's converter style), dropped keys with their reason
    (`convert-weights -v`)."""
    for old, new in mapping:
        err.print(f"  {old} -> {new if new else '(dropped: ' + reasons.get(old, 'unused') + ')'}", markup=False)


def unwrap_state_dict(obj, path: str | Path) -> dict:
    """The state dict of tensors inside a loaded checkpoint ({"state_dict": ...} / {"model": ...} containers)."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def load_state_dict(path: str | Path) -> dict:
    """A state dict from a checkpoint file (see `unwrap_state_dict`)."""
    return unwrap_state_dict(load_file(path), path)
