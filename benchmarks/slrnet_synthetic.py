"""SLRNet on the synthetic shapes over several seeds, through the real CLI (issue: the SLRNet comparison).

    python benchmarks/slrnet_synthetic.py [--seeds 0 1 2] [--runs DIR] [--arms slrnet cls semi supervised]
                                          [--set key=value ...] [--result NAME]

Arms (recipes), each trained with train.seed=k:
    slrnet      slrnet-synthetic          image labels of the 1,016 training images only
    cls         slrnet-synthetic-cls      the same network and tags, the classification loss only (CAMs)
    semi        slrnet-synthetic-semi     the 64 pixel-labelled images x3 + 952 with image labels
    supervised  supervised-synthetic      the same 64 pixel-labelled images alone
For each final model (last.pt: no selection on any split): val mIoU, and for the weakly supervised arms the
train pseudo-mask mIoU: the 1,016 training images predicted with their given image labels
(`eval.image_labels=given`, what the two-stage path labels them with) against their masks, through a view of
the data root whose `splits/train.txt` lists them (the data root itself is not written to). Writes
benchmarks/results/<result>.json with per-seed figures, wall times and mean ± std per arm. A finished run is
reused, an interrupted one resumed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from demo_gain import semiseg  # the benchmarks' one CLI runner (this folder is the script's path)

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"slrnet": "slrnet-synthetic", "cls": "slrnet-synthetic-cls", "semi": "slrnet-synthetic-semi",
        "supervised": "supervised-synthetic"}
WEAK = {"slrnet", "cls"}


def train(arm: str, out: Path, seed: int, sets: list[str]) -> float:
    done = out / "wall.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    t = time.time()
    args = ["--out", out, "--resume"] if (out / "last.pt").is_file() else \
        ["--recipe", ARMS[arm], "--out", out, "--set", f"train.seed={seed}", *[a for s in sets for a in ("--set", s)]]
    print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {arm}", flush=True)
    semiseg("train", *args)
    seconds = round(time.time() - t, 1)
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def train_view(data: Path, view: Path) -> Path:
    """A folder that links the data's images, masks and classes and lists the split-64 training images as
    splits/train.txt (an eval split)."""
    if not (view / "splits" / "train.txt").is_file():
        (view / "splits").mkdir(parents=True, exist_ok=True)
        for name in ("images", "masks", "classes.txt"):
            if not (view / name).exists():
                (view / name).symlink_to(data / name)
        lines = [ln for f in ("labeled", "unlabeled") for ln in (data / "splits" / "64" / f"{f}.txt").read_text().splitlines()
                 if ln.strip()]
        (view / "splits" / "train.txt").write_text("\n".join(lines) + "\n")
    return view


def evaluate(checkpoint: Path, *sets: str) -> float:
    return json.loads(semiseg("eval", "--checkpoint", checkpoint, *[a for s in sets for a in ("--set", s)],
                              "--json"))["miou"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-slrnet")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--result", default="slrnet_synthetic-cpu")
    args = ap.parse_args()
    data = args.data.resolve()
    view = train_view(data, args.runs.resolve() / "train-view")
    sets = [f"dataset.root={data}", *args.sets]
    per_seed = {}
    for seed in args.seeds:
        row = {}
        for arm in args.arms:
            out = args.runs / f"seed{seed}" / arm
            row[arm] = {"seconds": train(arm, out, seed, sets),
                        "val_miou": evaluate(out / "last.pt", f"dataset.root={data}")}
            if arm in WEAK:
                row[arm]["train_pseudo_miou"] = evaluate(out / "last.pt", f"dataset.root={view}",
                                                         "dataset.eval_split=train", "eval.image_labels=given")
            print(f"  {arm}: {row[arm]}", flush=True)
        per_seed[seed] = row

    def stats(values):
        return {"mean": round(statistics.mean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}

    summary = {arm: {k: stats([per_seed[s][arm][k] for s in args.seeds])
                     for k in per_seed[args.seeds[0]][arm] if k != "seconds"} for arm in args.arms}
    result = {"benchmark": "slrnet_synthetic", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
              or platform.machine(), "seeds": args.seeds, "sets": args.sets, "per_seed": per_seed, "summary": summary}
    path = ROOT / "benchmarks" / "results" / f"{args.result}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
