"""`semiseg convert-weights`: turn the originals' weight files into this project's state dicts.

A converter is a rename function from a source key to a target key (or None: dropped on purpose, with a
reason) plus special cases. `convert()` then asserts that every source key was used, that the result has
exactly the keys of the reference model and that every shape matches, prints the mapping, and writes a
plain state dict of tensors (atomically). Files are read with `weights_only=True`.
"""
from __future__ import annotations

import inspect
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


def _clip():
    from semiseg_cli.convert import clip
    return clip


# format -> loader of the module implementing it (imported lazily: `semiseg --help` stays fast)
FORMATS: dict[str, Callable] = {
    "torchvision-resnet": _resnet,
    "unimatch-resnet": _resnet,
    "mmseg-resnet": _resnet,
    "efficientnet-lite0": _effnet,
    "openai-clip": _clip,
    "open-clip": _clip,
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
    from semiseg_cli.engine.checkpoint import load_file

    return unwrap_state_dict(load_file(path), path)


def convert(fmt: str, src: str, dst: str | Path, backbone: str | None = None, quiet: bool = False,
            model_name: str | None = None) -> dict:
    """Convert `src` (format `fmt`) into a state dict for the timm model `backbone` and save it to `dst`.

    A format module's `convert(fmt, src, backbone[, model_name=...])` returns (converted, mapping, reasons,
    target[, sidecars]); `sidecars` maps a suffix to a state dict written beside DST as `<DST stem><suffix>`
    (None: remove a stale one), e.g. the CLIP text tower `<DST stem>.text.pt`.

    Returns {"format", "backbone", "keys", "dst"} (+ "sidecars": the paths written, if any).
    """
    from semiseg_cli.engine.checkpoint import save_atomic

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}; choose one of: {', '.join(FORMATS)}")
    module = FORMATS[fmt]()
    options = {}
    if model_name is not None:
        if "model_name" not in inspect.signature(module.convert).parameters:
            raise UserError(f"--model-name does not apply to the {fmt} format")
        options["model_name"] = model_name
    converted, mapping, reasons, target, *rest = module.convert(fmt, src, backbone, **options)
    sidecars = rest[0] if rest else {}
    if not quiet:
        print_mapping(mapping, reasons)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(converted, dst)
    written = []
    for suffix, state in sidecars.items():
        path = dst.with_name(dst.stem + suffix)
        if state is not None:
            save_atomic(state, path)
            written.append(str(path))
        elif path.is_file():  # a sidecar of an earlier conversion would not match the new weights
            path.unlink()
    kind = getattr(module, "TARGET_KIND", "timm ")
    also = f" and {', '.join(written)}" if written else ""
    err.print(f"{len(mapping)} source keys -> {len(converted)} keys of {kind}{target}; wrote {dst}{also}")
    result = {"format": fmt, "backbone": target, "keys": len(converted), "dst": str(dst)}
    return {**result, "sidecars": written} if written else result
