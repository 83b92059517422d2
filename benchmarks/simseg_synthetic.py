"""SimSeg's pooling ablation on the synthetic shapes' captions over several seeds, through the real CLI (issue:
SimSeg; the paper's claim: LoDA >> dense (avg) alignment for zero-shot segmentation).

    python benchmarks/simseg_synthetic.py [--seeds 0 1 2] [--pools loda avg] [--runs DIR] [--set key=value ...]
                                          [--result NAME]

Each arm trains `simseg-synthetic` (image-caption pairs only: `prepare-data synthetic --captions` first) with
simseg.pool=<pool> and train.seed=k. For each final model (last.pt, no selection on any split): the zero-shot
val mIoU (SimSeg's candidate rule and CRF) and the retrieval figures on the val pairs
(captions/valid.parquet: I2T / T2I R@1/5/10, RSUM). Writes benchmarks/results/<result>.json with per-seed
figures, wall times and mean ± std per arm. A finished run is reused, an interrupted one resumed. (pool cls needs
a ViT's CLS token; the CPU recipe's tower is a CNN.)
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


def train(pool: str, out: Path, seed: int, sets: list[str]) -> float:
    done = out / "wall.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    t = time.time()
    args = ["--out", out, "--resume"] if (out / "last.pt").is_file() else \
        ["--recipe", "simseg-synthetic", "--out", out, "--set", f"train.seed={seed}", "--set", f"simseg.pool={pool}",
         *[a for s in sets for a in ("--set", s)]]
    print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {pool}", flush=True)
    semiseg("train", *args)
    seconds = round(time.time() - t, 1)
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pools", nargs="+", default=["loda", "avg"], choices=["loda", "avg"])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-simseg")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--result", default="simseg_synthetic-cpu")
    args = ap.parse_args()
    data = args.data.resolve()
    sets = [f"dataset.root={data}", f"simseg.vocab={data / 'captions' / 'vocab.txt'}",
            f"captions.path={data / 'captions' / 'train_anno.csv'}", *args.sets]
    per_seed = {}
    for seed in args.seeds:
        row = {}
        for pool in args.pools:
            out = args.runs / f"seed{seed}" / pool
            seconds = train(pool, out, seed, sets)
            seg = json.loads(semiseg("eval", "--checkpoint", out / "last.pt", "--json"))
            ret = json.loads(semiseg("eval", "--checkpoint", out / "last.pt", "--retrieval",
                                     data / "captions" / "valid.parquet", "--json"))
            row[pool] = {"seconds": seconds, "val_miou": seg["miou"], "rsum": ret["rsum"], "i2t_r1": ret["i2t_r1"],
                         "t2i_r1": ret["t2i_r1"]}
            print(f"  {pool}: {row[pool]}", flush=True)
        per_seed[seed] = row

    def stats(values):
        return {"mean": round(statistics.mean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}

    summary = {pool: {k: stats([per_seed[s][pool][k] for s in args.seeds]) for k in per_seed[args.seeds[0]][pool]
                      if k != "seconds"} for pool in args.pools}
    result = {"benchmark": "simseg_synthetic", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
              or platform.machine(), "seeds": args.seeds, "sets": args.sets, "per_seed": per_seed, "summary": summary}
    path = ROOT / "benchmarks" / "results" / f"{args.result}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
