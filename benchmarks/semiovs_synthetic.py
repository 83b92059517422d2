"""SemiOVS's idea on the embedded data: UniMatch vs SemiOVS-UniMatch vs UniMatch fed the out-of-distribution
images as plain unlabeled data, same labeled images and iteration budget, several seeds.

    python benchmarks/semiovs_synthetic.py [--seeds 0 1 2] [--set key=value ...] [--parallel N]

Per seed, through the real CLI: `supervised-synthetic` (64 labeled images) labels the 1,000 OOD images of
`prepare-data synthetic-ood` with `gen-pseudo --model checkpoint --list` (standing in for SED: the labeler
knows the target classes, its labels are imperfect); the pseudo-labels' mIoU against the OOD truth is
reported; then `unimatch-synthetic`, `semiovs-synthetic` (those labels) and `unimatch-synthetic` with the
OOD images appended to its unlabeled list (the baseline the paper argues against) train with that seed.
Runs go to runs/bench-semiovs-synthetic/ and are reused / resumed as in ssl_synthetic.py; the final val
mIoU (not the best) is compared. JSON in benchmarks/results/semiovs_synthetic.json (`--result NAME`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_synthetic import ROOT, run_one  # benchmarks/ is on sys.path when this script runs


def cli(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "semiseg_cli", *map(str, args)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"semiseg {' '.join(map(str, args[:2]))} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def label_miou(pseudo: Path, truth: Path, names: list[str], k: int = 6) -> float:
    """mIoU of the pseudo-labels against the OOD truth masks (the evaluator's confusion and metrics)."""
    import torch

    from semiseg_cli.engine.evaluate import confusion, metrics

    conf = torch.zeros(k, k, dtype=torch.long)
    for n in names:
        p, t = (torch.from_numpy(np.asarray(Image.open(d / n)).astype(np.int64)) for d in (pseudo, truth))
        conf += confusion(p, t, k)
    return round(metrics(conf, [str(c) for c in range(k)])["miou"], 2)


def merged_root(data: Path, ood: Path, runs: Path) -> Path:
    """A root whose split `64ood` is split 64 with every OOD image appended to its unlabeled list."""
    from semiseg_cli.data.splits import read_split, write_split

    root = runs / "merged-root"
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("images", data / "images"), ("masks", data / "masks"), ("ood", ood / "images")):
        if not (root / name).exists():
            (root / name).symlink_to(target.resolve())
    (root / "classes.txt").write_text((data / "classes.txt").read_text())
    write_split(root / "splits" / "64ood" / "labeled.txt", read_split(data / "splits" / "64" / "labeled.txt"))
    unlabeled = read_split(data / "splits" / "64" / "unlabeled.txt", need_masks=False)
    extra = [(f"ood/{p.name}", None) for p in sorted((ood / "images").iterdir())]
    write_split(root / "splits" / "64ood" / "unlabeled.txt", [(i, None) for i, _ in unlabeled] + extra)
    write_split(root / "splits" / "val.txt", read_split(data / "splits" / "val.txt"))
    return root


def one_seed(seed: int, args, merged: Path) -> list[dict]:
    o = args.overrides
    data = [f"dataset.root={args.data}"]
    sup = run_one("supervised", seed, args.runs, o + data)
    pseudo, lst = args.ood / f"pseudo-seed{seed}", args.ood / "splits" / f"ood-seed{seed}" / "labeled.txt"
    cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", args.runs / f"supervised-seed{seed}" / "best.pt",
        "--images", args.ood / "ood_images.txt", "--out", pseudo, "--list", lst, "--root", args.ood)
    names = sorted(p.name for p in (args.ood / "images").iterdir())
    sup["ood_label_miou"] = label_miou(pseudo, args.ood / "masks", names)
    uni = run_one("unimatch", seed, args.runs, o + data)
    ovs = run_one("semiovs", seed, args.runs, o + data + [f"dataset.ood_list={lst}", f"dataset.ood_root={args.ood}"])
    with_ood = run_one("unimatch", seed, args.runs / "unimatch-ood-as-unlabeled", o + [f"dataset.root={merged}",
                                                                                       "dataset.split=64ood"])
    with_ood = {**with_ood, "method": "unimatch+ood-unlabeled"}
    return [sup, uni, ovs, with_ood]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--ood", type=Path, default=ROOT / "data" / "synthetic_ood")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-semiovs-synthetic")
    ap.add_argument("--result", default="semiovs_synthetic")
    ap.add_argument("--parallel", type=int, default=1, metavar="N", help="seeds run at once (default 1)")
    args = ap.parse_args()
    args.data, args.ood, args.runs = args.data.absolute(), args.ood.absolute(), args.runs.absolute()
    if not (args.data / "splits" / "64").is_dir():
        cli("prepare-data", "synthetic", "--root", args.data)
    if not (args.ood / "ood_images.txt").is_file():
        cli("prepare-data", "synthetic-ood", "--root", args.ood)
    merged = merged_root(args.data, args.ood, args.runs)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        runs = [r for rs in pool.map(lambda s: one_seed(s, args, merged), args.seeds) for r in rs]
    summary = {}
    for m in ("supervised", "unimatch", "semiovs", "unimatch+ood-unlabeled"):
        finals = [r["final_miou"] for r in runs if r["method"] == m]
        summary[m] = {"mean": round(statistics.mean(finals), 2),
                      "std": round(statistics.stdev(finals), 2) if len(finals) > 1 else 0.0, "n": len(finals)}
    labels = [r["ood_label_miou"] for r in runs if "ood_label_miou" in r]
    result = {"overrides": args.overrides, "seeds": args.seeds, "summary": summary,
              "ood_pseudo_label_miou": {"mean": round(statistics.mean(labels), 2), "values": labels},
              "device": os.environ.get("CUDA_VISIBLE_DEVICES", "default"), "runs": runs}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.result}.json").write_text(json.dumps(result, indent=2))
    for m, s in summary.items():
        print(f"{m:<24} {s['mean']:>7.2f} ± {s['std']:.2f}  (n={s['n']})")
    print(f"OOD pseudo-label mIoU (supervised-synthetic labeler): {result['ood_pseudo_label_miou']['mean']:.2f}")


if __name__ == "__main__":
    main()
