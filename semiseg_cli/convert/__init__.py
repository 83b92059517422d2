"""`semiseg convert-weights`: turn the originals' weight files into this project's state dicts.

A converter is a rename function from a source key to a target key (or None: dropped on purpose, with a
reason) plus special cases. `convert()` then asserts that every source key was used, that the result has
exactly the keys of the reference model and that every shape matches, prints the mapping, and writes a
plain state dict of tensors (atomically). Files are read with `weights_only=True`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from semiseg_cli.console import err
from semiseg_cli.data.datasets import did_you_mean
from semiseg_cli.errors import UserError


def _resnet():
    from semiseg_cli.convert import resnet
    return resnet


def _effnet():
    from semiseg_cli.convert import efficientnet_lite
    return efficientnet_lite


# format -> loader of the module implementing it (imported lazily: `semiseg --help` stays fast)
FORMATS: dict[str, Callable] = {
    "torchvision-resnet": _resnet,
    "unimatch-resnet": _resnet,
    "efficientnet-lite0": _effnet,
}


def check_and_report(mapping: list[tuple[str, str | None]], source: dict, converted: dict, reference: dict,
                     what: str) -> None:
    """Every source key used (or dropped with a reason), the reference's keys exactly, every shape equal."""
    used = {old for old, _ in mapping}
    unused = sorted(set(source) - used)
    missing = sorted(set(reference) - set(converted))
    extra = sorted(set(converted) - set(reference))
    wrong = [k for k in converted if k in reference and tuple(converted[k].shape) != tuple(reference[k].shape)]
    if unused or missing or extra or wrong:
        parts = []
        for label, keys in (("unused source keys", unused), ("missing target keys", missing),
                            ("unknown target keys", extra), ("shape mismatches", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise UserError(f"the file does not convert to {what}: " + ", ".join(parts))


def print_mapping(mapping: list[tuple[str, str | None]], reasons: dict[str, str]) -> None:
    for old, new in mapping:
        err.print(f"  {old} -> {new if new else '(dropped: ' + reasons.get(old, 'unused') + ')'}", markup=False)


def load_state_dict(path: str | Path) -> dict:
    """A state dict from a checkpoint file; unwraps {"state_dict": ...} / {"model": ...} containers."""
    from semiseg_cli.engine.checkpoint import load_file

    obj = load_file(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def convert(fmt: str, src: str, dst: str | Path, backbone: str | None = None, quiet: bool = False) -> dict:
    """Convert `src` (format `fmt`) into a state dict for the timm model `backbone` and save it to `dst`.

    Returns {"format", "backbone", "keys", "dst"}.
    """
    from semiseg_cli.engine.checkpoint import save_atomic

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}; choose one of: {', '.join(FORMATS)}")
    module = FORMATS[fmt]()
    converted, mapping, reasons, target = module.convert(fmt, src, backbone)
    if not quiet:
        print_mapping(mapping, reasons)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(converted, dst)
    err.print(f"{len(mapping)} source keys -> {len(converted)} keys of timm {target}; wrote {dst}")
    return {"format": fmt, "backbone": target, "keys": len(converted), "dst": str(dst)}
