"""`semiseg convert-weights`: turn the originals' weight files into this project's state dicts.

A format module (`convert/<module>.py`) maps source keys to target keys (or None: dropped on purpose, with a
reason) plus special cases, checks with `common.check_and_report` that every source key was used, that the
result has exactly the keys of the reference model and that every shape matches, and returns a
`common.Converted`. `convert()` here writes a plain state dict of tensors (atomically) and prints a summary
(keys mapped, dropped, sidecar files; with `verbose` every `old -> new` pair first). Files are read with
`weights_only=True`.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from semiseg_cli.errors import UserError, unknown_name

# format -> the module implementing it (imported on use: `semiseg --help` stays fast)
FORMATS: dict[str, str] = {
    "torchvision-resnet": "semiseg_cli.convert.resnet",
    "unimatch-resnet": "semiseg_cli.convert.resnet",
    "mmseg-resnet": "semiseg_cli.convert.resnet",
    "efficientnet-lite0": "semiseg_cli.convert.efficientnet_lite",
    "openai-clip": "semiseg_cli.convert.clip",
    "open-clip": "semiseg_cli.convert.clip",
    "unimatch-checkpoint": "semiseg_cli.convert.unimatch_checkpoint",
    "sed": "semiseg_cli.convert.sed",
    "unimatch-xception": "semiseg_cli.convert.unimatch_xception",
    "wideresnet38": "semiseg_cli.convert.wideresnet38",
    "slrnet": "semiseg_cli.convert.slrnet",
    "simseg": "semiseg_cli.convert.simseg",
    "timm-vit": "semiseg_cli.convert.simseg_init",
    "bert": "semiseg_cli.convert.simseg_init",
}
# option -> (its flag, the formats that take it): --model-name, the open_clip config giving the activation;
# --recipe / --set, the recipe a trained checkpoint was trained with; --tokenizer, SimSeg's BERT vocabulary
TRAINED = {"unimatch-checkpoint", "slrnet", "simseg"}
OPTIONS = {"model_name": ("--model-name", {"open-clip"}), "recipe": ("--recipe", TRAINED), "sets": ("--set", TRAINED),
           "tokenizer": ("--tokenizer", {"simseg"})}


def convert(fmt: str, src: str, dst: str | Path, backbone: str | None = None, quiet: bool = False,
            model_name: str | None = None, recipe: str | None = None, sets=(), verbose: bool = False,
            tokenizer: str | None = None) -> dict:
    """Convert `src` (format `fmt`) for the model `backbone` (default: inferred) and save it to `dst`.
    Prints a summary line on stderr, the whole key mapping too with `verbose`, nothing with `quiet`.

    Returns {"format", "backbone", "keys", "dst"} (+ "sidecars": the paths written, if any).

    Example:
        convert("efficientnet-lite0", "-", "weights/tf_efficientnet_lite0.pt", quiet=True)
        # -> {"format": "efficientnet-lite0", "backbone": "tf_efficientnet_lite0", "keys": ..., "dst": ...}
    """
    from semiseg_cli.console import err
    from semiseg_cli.convert.common import print_mapping
    from semiseg_cli.errors import check_output_dir, writing
    from semiseg_cli.io import save_atomic, state_checksum

    if fmt not in FORMATS:
        raise unknown_name("format", fmt, FORMATS)
    dst = Path(dst)
    if dst.is_dir():
        raise UserError(f"DST {dst}: is a folder; pass the file to write, e.g. {dst / 'weights.pt'}")
    check_output_dir(dst.parent, "DST's folder")  # before the (slow) conversion
    options = {"model_name": model_name, "recipe": recipe, "sets": list(sets) or None, "tokenizer": tokenizer}
    for name, value in options.items():
        flag, formats = OPTIONS[name]
        if value is not None and fmt not in formats:
            raise UserError(f"{flag} does not apply to the {fmt} format (only to {', '.join(sorted(formats))})")
    module = importlib.import_module(FORMATS[fmt])
    result = module.convert(fmt, src, backbone, **{k: v for k, v in options.items() if v is not None})
    if verbose and not quiet:
        print_mapping(result.mapping, result.reasons)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with writing(dst):
        if result.config is not None:
            from semiseg_cli import __version__

            save_atomic({"model": result.state, "config": result.config, "version": __version__,
                         "converted_from": str(src), "checksum": state_checksum(result.state)}, dst)
        else:
            save_atomic(result.state, dst)
    written = {}  # sidecar path -> its number of keys
    for suffix, state in result.sidecars.items():
        path = dst.with_name(dst.stem + suffix)
        if state is not None:
            with writing(path):
                save_atomic(state, path)
            written[str(path)] = len(state)
        elif path.is_file():  # a sidecar of an earlier conversion would not match the new weights
            path.unlink()
    if not quiet:
        kind = getattr(module, "TARGET_KIND", "timm ")
        dropped = sum(new is None for _, new in result.mapping)
        sidecars = f"; {len(written)} sidecar file(s): " + ", ".join(f"{p} ({n} keys)" for p, n in written.items())
        hint = "" if verbose else " (-v lists every key)"
        err.print(f"{len(result.mapping)} source keys: {len(result.mapping) - dropped} mapped, {dropped} dropped; wrote "
                  f"{dst} ({len(result.state)} keys of {kind}{result.target}){sidecars if written else ''}{hint}",
                  markup=False)
    summary = {"format": fmt, "backbone": result.target, "keys": len(result.state), "dst": str(dst)}
    return {**summary, "sidecars": list(written)} if written else summary
