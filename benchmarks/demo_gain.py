"""The CPU demo's comparison over several seeds: supervised training vs UniMatch on the same 64 labeled
synthetic images, both continued for the same iterations from one supervised warm-up, as `make demo` runs it.

    python benchmarks/demo_gain.py [--seeds 0 1 2] [--runs DIR] [--set key=value ...]

Per seed k (train.seed=k for all three runs, through the real CLI):
    supervised-synthetic-warmup                  -> RUNS/seed<k>/warmup
    supervised-synthetic-demo  (init: warmup)    -> RUNS/seed<k>/supervised
    unimatch-synthetic-demo    (init: warmup)    -> RUNS/seed<k>/unimatch
then both final models (last.pt: no selection on any split) are evaluated on the held-out `test` split
(200 images never used to choose the demo's settings, which were chosen on `val`) and on `val`. Writes
benchmarks/results/demo_gain-cpu.json (`--result NAME`): per seed the mIoUs and wall times, and the mean
± std over seeds of each arm and of the gain. A finished run is reused, an interrupted one resumed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"warmup": "supervised-synthetic-warmup", "supervised": "supervised-synthetic-demo",
          "unimatch": "unimatch-synthetic-demo"}


def semiseg(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "semiseg_cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"semiseg {' '.join(map(str, args))} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def train(stage: str, out: Path, seed: int, sets: list[str]) -> float:
    """Train one stage; returns its wall time in seconds. A finished stage (wall.json) is reused, an
    interrupted one (last.pt) resumed."""
    done = out / "wall.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    t = time.time()
    args = ["--out", out, "--resume"] if (out / "last.pt").is_file() else \
        ["--recipe", STAGES[stage], "--out", out, "--set", f"train.seed={seed}",
         *[a for s in sets for a in ("--set", s)]]
    print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {stage}", flush=True)
    semiseg("train", *args)
    seconds = round(time.time() - t, 1)
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def miou(checkpoint: Path, split: str) -> float:
    return json.loads(semiseg("eval", "--checkpoint", checkpoint, "--set", f"dataset.eval_split={split}",
                              "--json"))["miou"]


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0, "n": len(values)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-demo")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (e.g. dataset.root=DIR)")
    ap.add_argument("--result", default="demo_gain-cpu")
    args = ap.parse_args()

    per_seed = []
    for seed in args.seeds:
        base = args.runs / f"seed{seed}"
        wall = {"warmup": train("warmup", base / "warmup", seed, args.sets)}
        for arm in ("supervised", "unimatch"):
            wall[arm] = train(arm, base / arm, seed, args.sets + [f"model.init_checkpoint={base / 'warmup' / 'last.pt'}"])
        row = {"seed": seed, "wall_seconds": wall,
               "warmup": {s: miou(base / "warmup" / "last.pt", s) for s in ("val", "test")}}
        for arm in ("supervised", "unimatch"):
            row[arm] = {s: miou(base / arm / "last.pt", s) for s in ("val", "test")}
        row["gain"] = {s: round(row["unimatch"][s] - row["supervised"][s], 2) for s in ("val", "test")}
        per_seed.append(row)
        print(f"seed {seed}: test mIoU supervised {row['supervised']['test']:.2f}, UniMatch {row['unimatch']['test']:.2f} "
              f"({row['gain']['test']:+.2f}); val {row['supervised']['val']:.2f} / {row['unimatch']['val']:.2f}", flush=True)

    summary = {split: {arm: mean_std([r[arm][split] for r in per_seed]) for arm in ("warmup", "supervised", "unimatch", "gain")}
               for split in ("test", "val")}
    result = {"benchmark": "make demo's comparison (benchmarks/demo_gain.py)", "stages": STAGES, "overrides": args.sets,
              "device": f"cpu ({platform.machine()}, {__import__('os').cpu_count()} cores)",
              "summary": summary, "seeds": per_seed}
    out = ROOT / "benchmarks" / "results" / f"{args.result}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
