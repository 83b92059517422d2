"""Pictures of runs, drawn with matplotlib's Agg backend (no display needed): training curves of one or
more run folders (`semiseg plot`) and a row-normalised confusion matrix (`semiseg eval --confusion`).

The curves come from each run's `log.jsonl`: training records (iter, loss, lr, mask_ratio) and evaluation
records (iter, miou); runs are overlaid, one colour per run, labelled by the folder name. The same log
gives every run's results.csv (one row per evaluation), written by the trainer.
"""
from __future__ import annotations

import bisect
import io
import json
from pathlib import Path

import numpy as np

from semiseg_cli.errors import UserError
from semiseg_cli.io import write_atomic

# panel title -> the log key it plots (mask_ratio: the fraction of unlabeled pixels whose pseudo-label is kept)
PANELS = {"training loss": "loss", "learning rate": "lr", "pseudo-label kept ratio": "mask_ratio",
          "val mIoU": "miou"}


def read_log(run: Path) -> list[dict]:
    """The records of `run/log.jsonl` (a torn last line of a killed run is skipped)."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no log.jsonl; pass run folders written by `semiseg train`")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of `key`, the last record per iteration kept (a resumed run may repeat one)."""
    by_iter = {r["iter"]: r[key] for r in records if key in r and "iter" in r}
    its = sorted(by_iter)
    return its, [by_iter[i] for i in its]


# results.csv: one row per evaluation, the training values of the log window that ended there
RESULT_COLUMNS = ("iter", "epoch", "loss", "lr", "mask_ratio", "miou", "best_miou", "miou_paper", "pixel_acc",
                  "it_per_s")


def results_rows(records: list[dict]) -> list[dict]:
    """The rows of results.csv from log records: per evaluated iteration, its evaluation values plus those
    of the last training record at or before it ('' where a run does not log a column)."""
    evals = {r["iter"]: r for r in records if "miou" in r and "iter" in r}
    train = sorted(((r["iter"], r) for r in records if "loss" in r and "iter" in r), key=lambda t: t[0])
    its = [i for i, _ in train]
    rows = []
    for it in sorted(evals):
        n = bisect.bisect_right(its, it)  # the training records at or before `it`
        merged = {**(train[n - 1][1] if n else {}), **evals[it]}
        rows.append({c: merged.get(c, "") for c in RESULT_COLUMNS})
    return rows


def write_results_csv(run: Path) -> Path:
    """RUN/results.csv from RUN/log.jsonl (rewritten whole, atomically: a resumed run's repeated iterations
    appear once)."""
    import csv

    path = Path(run) / "results.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results_rows(read_log(run)))
    write_atomic(path, lambda f: f.write(buf.getvalue().encode()))
    return path


def _save(fig, out: Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(out, lambda f: f.write(buf.getvalue()))


def plot_runs(runs: list[Path], out: Path) -> dict:
    """One PNG with a panel per PANELS entry, every run overlaid. Returns {"out", "runs", "panels": points}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {Path(r).name or str(r): read_log(r) for r in runs}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    counts = {}
    for ax, (title, key) in zip(axes.flat, PANELS.items()):
        n = 0
        for name, records in logs.items():
            its, values = series(records, key)
            if its:
                ax.plot(its, values, marker="o" if key == "miou" else None, markersize=3, label=name)
                n += len(its)
        counts[title] = n
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if not n:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        elif len(logs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(out))
    plt.close(fig)
    return {"out": str(out), "runs": list(logs), "points": counts}


def confusion_png(confusion: np.ndarray, class_names: list[str], out: Path, title: str = "") -> None:
    """The confusion matrix (rows: ground truth, columns: prediction), each row normalised to sum 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(confusion, dtype=np.float64)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    k = len(class_names)
    size = min(4 + 0.35 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "confusion (rows normalised)")
    fig.tight_layout()
    _save(fig, Path(out))
    plt.close(fig)


def overlay_with_legend(picture: np.ndarray, mask: np.ndarray, pal: np.ndarray, class_names: list[str],
                        out: Path) -> None:
    """`picture` (the blended overlay, [H, W, 3] uint8) at its own pixel size with, to its right, a legend
    of the classes present in `mask` (most pixels first) in their palette colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    h, w = mask.shape
    ids, counts = np.unique(mask, return_counts=True)
    present = [int(c) for c, _ in sorted(zip(ids, counts), key=lambda t: -t[1]) if c < len(class_names)]
    dpi, row = 100, 16                                     # legend rows of 16 px (font 8)
    legend_w = 12 + 7 * max([len(class_names[c]) for c in present] + [4]) + 30
    fig_h = max(h, row * len(present) + 12)
    fig = plt.figure(figsize=((w + legend_w) / dpi, fig_h / dpi), dpi=dpi)
    ax = fig.add_axes([0, 1 - h / fig_h, w / (w + legend_w), h / fig_h])
    ax.imshow(picture, interpolation="nearest")
    ax.axis("off")
    handles = [Patch(facecolor=pal[c] / 255.0, edgecolor="black", linewidth=0.5, label=class_names[c]) for c in present]
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(w / (w + legend_w), 1), fontsize=8,
                   frameon=False, handlelength=1.2, borderaxespad=0.3, labelspacing=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(Path(out), lambda f: f.write(buf.getvalue()))
