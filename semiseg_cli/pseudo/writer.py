"""The one pseudo-label writer: every labeler's scores become the same files.

Per image `<stem>` of the input:
    OUT/<stem>.png          index PNG in the labeler's palette: argmax of the scores, 255 where the max score
                            is below --ignore-below
    OUT/conf/<stem>.png     with --save-conf: uint8 round(255 x max score)
    OUT/scores/<stem>.npy   with --save-scores: float32 [K, H, W], the scores the label was taken from
and, with --list FILE --root DIR, a split list `<image> <mask>` relative to DIR with one line per labelled
image (input order), readable as a training split (`<root>/splits/<split>/labeled.txt`).

Every file is written atomically and the label last, so an image whose label exists (with the extras
asked for) is finished: a killed run restarts where it stopped and a second run skips everything. A
corrupt image is reported and skipped; the others are written. Under torchrun each process labels every
world-th image (disjoint shards) and rank 0 writes the merged list once all are done.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from semiseg_cli.console import err
from semiseg_cli.data.facts import IGNORE_INDEX
from semiseg_cli.data.splits import check_relative, write_split
from semiseg_cli.distributed import DistEnv, all_reduce_sum, barrier
from semiseg_cli.engine.infer import check_unique_stems, list_images, predict_images
from semiseg_cli.errors import UserError
from semiseg_cli.io import save_index_png, write_atomic
from semiseg_cli.pseudo import Labeler


def _relative_to(path: Path, root: Path, what: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))  # symlinks kept: paths as the user wrote them
    if rel.startswith(".."):
        raise UserError(f"{path}: the {what} is not under --root {root}; a split list holds paths inside the dataset root")
    return check_relative(rel.replace(os.sep, "/"), str(path))


def _paths(out: Path, stem: str) -> dict:
    return {"label": out / f"{stem}.png", "conf": out / "conf" / f"{stem}.png", "scores": out / "scores" / f"{stem}.npy"}


def generate(labeler: Labeler, images: str | Path, out: str | Path, env: DistEnv, ignore_below: float | None = None,
             save_conf: bool = False, save_scores: bool = False, list_file: str | Path | None = None,
             list_root: str | Path | None = None, batch_size: int = 4, workers: int = 2, crf: bool = False) -> dict:
    """Label every image of `images` into `out` (see the module docstring).

    Returns the summary (over all processes): written, skipped (already done), failed (a count; this process's
    error lines in failed_files), mean_confidence and ignored_fraction over the written pixels, class_histogram (fraction of the
    written non-ignored pixels per class), and the list file.
    """
    files = list_images(images)
    check_unique_stems(files, "labels")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    extras = [k for k, on in (("conf", save_conf), ("scores", save_scores)) if on]
    lines = None
    if list_file is not None:
        if list_root is None:
            raise UserError("--list needs --root DIR: the dataset root the list's paths are relative to")
        lines = [(_relative_to(f, Path(list_root), "image"), _relative_to(_paths(out, f.stem)["label"], Path(list_root),
                                                                          "--out folder")) for f in files]
    for sub in ["."] + extras:
        (out / sub).mkdir(parents=True, exist_ok=True)

    def done(f: Path) -> bool:
        p = _paths(out, f.stem)
        return p["label"].is_file() and all(p[k].is_file() for k in extras)

    mine = files[env.rank::env.world]
    todo = [f for f in mine if not done(f)]
    k = len(labeler.class_names)
    # written, skipped, failed, confidence sum, pixels, ignored pixels, per-class pixels
    stats = torch.zeros(6 + k, dtype=torch.float64)
    stats[1] = len(mine) - len(todo)
    failed = []
    crf_params = labeler.cfg["crf"] if crf or labeler.cfg["eval"]["crf"] else None  # --crf, or a recipe's eval.crf
    for i, image, scores in predict_images(labeler.score_fn, todo, labeler.prepare, env.device, batch_size,
                                           workers, crf_params, desc="gen-pseudo"):
        if image is None:
            failed.append(scores)
            err.print(f"skipped: {scores}", markup=False)
            continue
        if scores.shape[0] != k:
            raise UserError(f"the labeler gives {scores.shape[0]} scores per pixel for {k} class names")
        conf = scores.max(0)
        label = scores.argmax(0).astype(np.uint8)
        if ignore_below is not None:
            label[conf < ignore_below] = IGNORE_INDEX
        paths = _paths(out, todo[i].stem)
        if save_scores:
            buf = io.BytesIO()
            np.save(buf, scores.astype(np.float32))
            write_atomic(paths["scores"], lambda f: f.write(buf.getvalue()))
        if save_conf:
            save_index_png(np.round(255 * np.clip(conf, 0, 1)).astype(np.uint8), paths["conf"])
        save_index_png(label, paths["label"], labeler.palette)  # last: its presence marks the image done
        kept = label[label != IGNORE_INDEX]
        stats[0] += 1
        stats[3] += float(conf.astype(np.float64).sum())
        stats[4] += label.size
        stats[5] += label.size - kept.size
        stats[6:] += torch.from_numpy(np.bincount(kept, minlength=k)[:k].astype(np.float64))
    stats[2] = len(failed)
    stats = all_reduce_sum(stats.to(env.device)).cpu()  # NCCL reduces device tensors only
    barrier()  # every shard written before the merged list
    if lines is not None and env.is_main:
        write_split(list_file, [line for f, line in zip(files, lines) if _paths(out, f.stem)["label"].is_file()])
    pixels, kept = float(stats[4]), float(stats[4] - stats[5])
    return {
        "written": int(stats[0]), "skipped": int(stats[1]), "failed": int(stats[2]), "failed_files": failed,
        "mean_confidence": round(float(stats[3]) / pixels, 4) if pixels else None,
        "ignored_fraction": round(float(stats[5]) / pixels, 4) if pixels else None,
        "class_histogram": {n: round(float(c) / kept, 4) if kept else 0.0 for n, c in zip(labeler.class_names, stats[6:])},
        "out": str(out), "list": str(list_file) if list_file is not None else None,
    }
