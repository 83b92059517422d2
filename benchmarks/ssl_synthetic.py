"""Semi-supervised methods vs supervised-only on the synthetic data: same labeled images, same iteration
budget, several seeds.

    python benchmarks/ssl_synthetic.py [--methods supervised fixmatch ...] [--seeds 0 1 2] [--set key=value ...]
                                       [--parallel N]

Trains `<method>-synthetic` through the real CLI for every method and seed (runs go to
runs/bench-ssl-synthetic/<method>-seed<k>/; a finished run is reused if it was trained from the same
recipe text and overrides, an interrupted one resumed), then writes benchmarks/results/ssl_synthetic.json
(`--result NAME` for another name): per run the final and best val mIoU, per method the mean and std
over seeds of the final mIoU and its gain over supervised. The final mIoU (not the best on val) is the
compared figure, so no method is selected on the validation set. `--parallel N` trains N runs at once
(for a GPU or a many-core machine: these models are small, one run leaves most of a GPU idle).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["supervised", "fixmatch", "unimatch", "prevmatch", "s4mc"]


def run_one(method: str, seed: int, runs: Path, overrides: list[str]) -> dict:
    out = runs / f"{method}-seed{seed}"
    cmd = [sys.executable, "-m", "semiseg_cli", "train", "--recipe", f"{method}-synthetic", "--out", str(out),
           "--set", f"train.seed={seed}"]
    for o in overrides:
        cmd += ["--set", o]
    # what the run was trained from: a finished run is reused only for the same recipe text and overrides
    setup = {"recipe_sha1": hashlib.sha1((ROOT / "recipes" / f"{method}-synthetic.yaml").read_bytes()).hexdigest(),
             "overrides": overrides}
    done = out / "done.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("setup") != setup:
            sys.exit(f"{out}: finished with another recipe or --set overrides than this call's; "
                     "delete it or pass --runs DIR")
        return result
    if (out / "last.pt").is_file():
        cmd = [sys.executable, "-m", "semiseg_cli", "train", "--out", str(out), "--resume"]
    t = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: training", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{method} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    ev = json.loads((out / "eval.json").read_text())
    result = {"method": method, "seed": seed, "final_miou": ev["miou"], "best_miou": ev["best_miou"],
              "iters": ev["iter"], "train_minutes": round((time.time() - t) / 60, 2), "setup": setup}
    done.write_text(json.dumps(result))
    print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: final mIoU {ev['miou']:.2f} (best {ev['best_miou']:.2f}), {result['train_minutes']} min", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (e.g. train.iters=100 for a quick look)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-ssl-synthetic")
    ap.add_argument("--result", default="ssl_synthetic",
                    help="name of the JSON in benchmarks/results/ (use another for runs with --set overrides)")
    ap.add_argument("--parallel", type=int, default=1, metavar="N", help="runs trained at once (default 1)")
    args = ap.parse_args()

    # seed by seed, so that an interrupted benchmark leaves whole seeds behind
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    pool = ThreadPoolExecutor(max(1, args.parallel))
    try:
        futures = [pool.submit(run_one, m, s, args.runs, args.overrides) for m, s in jobs]
        runs = [f.result() for f in futures]
    finally:  # on a failed run: let the ones in progress finish (they resume anyway), start no more
        pool.shutdown(cancel_futures=True)
    summary = {}
    for m in args.methods:
        finals = [r["final_miou"] for r in runs if r["method"] == m]
        summary[m] = {"mean": round(statistics.mean(finals), 2),
                      "std": round(statistics.stdev(finals), 2) if len(finals) > 1 else 0.0, "n": len(finals)}
    if "supervised" in summary:
        for m, s in summary.items():
            s["gain_over_supervised"] = round(s["mean"] - summary["supervised"]["mean"], 2)
    result = {"overrides": args.overrides, "seeds": args.seeds, "summary": summary, "runs": runs}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.result}.json").write_text(json.dumps(result, indent=2))
    print(f"{'method':<12} {'final mIoU':>16} {'gain':>7}")
    for m, s in summary.items():
        print(f"{m:<12} {s['mean']:>9.2f} ± {s['std']:<5.2f} {s.get('gain_over_supervised', 0):>+7.2f}")


if __name__ == "__main__":
    main()
