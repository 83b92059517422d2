"""Split lists in UniMatch's layout.

A split file has one sample per line: `<image path> <mask path>`, both relative to the dataset root
(unlabeled lines may omit the mask). Files are looked up first in `<root>/splits/` (written by
prepare-data for COCO's unlabeled lists, synthetic data and `folder` datasets), then in the packaged
`data/splits/<dataset>/`:

    <dataset>/<split>/labeled.txt
    <dataset>/<split>/unlabeled.txt
    <dataset>/val.txt
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from semiseg_cli.errors import UserError
from semiseg_cli.io import write_text_atomic
from semiseg_cli.resources import resource_dir

KINDS = ("labeled", "unlabeled", "val")


def split_path(dataset: str, split: str, kind: str, root: str | Path, eval_split: str = "val") -> Path:
    """Path of the `kind` list ("labeled", "unlabeled" or "val") of `dataset`/`split`; the "val" list is
    splits/<eval_split>.txt (the synthetic data also has a held-out `test`).

    Raises UserError naming every place looked at when none exists.
    """
    if kind not in KINDS:
        raise ValueError(kind)
    rel = f"{eval_split}.txt" if kind == "val" else f"{split}/{kind}.txt"
    candidates = [Path(root) / "splits" / rel, resource_dir("splits") / dataset / rel]
    for path in candidates:
        if path.is_file():
            return path
    available = available_splits(dataset, root)
    hint = f"; splits of {dataset}: {', '.join(available)}" if available else f"; run `semiseg prepare-data {dataset}`"
    raise UserError(f"no {kind} list for {dataset} split {split!r} (looked for {candidates[0]} and {candidates[1]}){hint}")


def available_splits(dataset: str, root: str | Path | None = None) -> list[str]:
    """Names of the splits that have a labeled.txt, packaged or under `<root>/splits`."""
    dirs = [resource_dir("splits") / dataset] + ([Path(root) / "splits"] if root else [])
    names = {p.parent.name for d in dirs if d.is_dir() for p in d.glob("*/labeled.txt")}
    return sorted(names, key=lambda s: (len(s), s))


def check_relative(rel: str, where: str) -> str:
    """Reject paths that would escape the dataset root (absolute, `..`)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise UserError(f"{where}: path {rel!r} escapes the dataset root; split lines must be relative paths inside it")
    return rel


def read_split(path: str | Path, need_masks: bool = True) -> list[tuple[str, str | None]]:
    """Read a split file into (image, mask) pairs of root-relative paths.

    Args:
        path: the split file.
        need_masks: if True, every line must name a mask.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the split list ({e.strerror})") from None
    items = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{n}"
        if len(parts) > 2 or (need_masks and len(parts) < 2):
            raise UserError(f"{where}: expected '<image> <mask>' relative to the dataset root, got {line!r}")
        image = check_relative(parts[0], where)
        mask = check_relative(parts[1], where) if len(parts) == 2 else None
        items.append((image, mask))
    if not items:
        raise UserError(f"{path}: the split list is empty")
    return items


def write_split(path: str | Path, items) -> None:
    """Write (image, mask) pairs as a split file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(f"{i} {m}\n" if m else f"{i}\n" for i, m in items))
