"""Time of one training step of each method, at equal labeled batch, relative to supervised.

    python benchmarks/method_step.py [--recipe supervised-synthetic] [--methods supervised unimatch ...]
                                     [--steps 10] [--device cuda] [--amp bf16] [--channels-last]

Runs each method's real `train_step` (plus backward and SGD step) on the recipe's model with random
batches of the recipe's batch and crop (labeled, unlabeled and mix-source streams of the same size).
PrevMatch runs with a full draw from a pool of three stored models, S4MC with its filter on, SemiVL with
its frozen guidance ViT (`--recipe semivl-voc-92 --methods supervised unimatch semivl`). Data loading
is not included (benchmarks/data_pipeline.py measures it). JSON on stdout and in
benchmarks/results/method_step-<recipe>-<device>[-<amp>][-cl].json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from semiseg_cli.config import load_config
from semiseg_cli.distributed import DistEnv
from semiseg_cli.data.streams import fake_batch
from semiseg_cli.engine.optim import build_optimizer
from semiseg_cli.engine.trainer import StepContext, load_method
from semiseg_cli.methods.prevmatch import PrevModelPool
from semiseg_cli.methods import semivl
from semiseg_cli.methods.s4mc import S4MCState
from semiseg_cli.models import build_model
from train_step import device_name, result_name, sync, write_result  # benchmarks/ is on sys.path when this script runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="supervised-synthetic")
    ap.add_argument("--methods", nargs="+", default=["supervised", "fixmatch", "unimatch", "prevmatch", "s4mc"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    env = DistEnv(device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "off")
    rows = {}
    for method in args.methods:
        cfg = load_config(args.recipe, ["model.weights=null", f"method={method}"])
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(cfg, model)
        b, crop, k = cfg["train"]["global_batch"], cfg["train"]["crop_size"], cfg["dataset"]["num_classes"]
        batch = fake_batch(n=b, size=crop, num_classes=k, device=device, pad_rows=0)
        state = None
        tmp = tempfile.TemporaryDirectory()
        if method == "prevmatch":
            state = PrevModelPool(cfg, model, Path(tmp.name), env)
            for i in range(3):
                state.after_eval(model, True, i)
            state.draw = lambda it: ([0, 1, 2], [1 / 3] * 3)  # time the most expensive draw
        elif method == "s4mc":
            state = S4MCState(torch.full((k,), 0.98, device=device))
        elif method == "semivl":  # the frozen guidance ViT and text (random weights: timing only)
            state = semivl.make_state(cfg, model, None, env)
        module = load_method(method)

        def step(i):
            with amp:
                loss, _ = module.train_step(model, batch, StepContext(cfg, i, 1000, env, state))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(2):
            step(i)
        sync(device)
        t = time.perf_counter()
        for i in range(args.steps):
            step(i)
        sync(device)
        sec = (time.perf_counter() - t) / args.steps
        rows[method] = {"seconds_per_step": round(sec, 4)}
        if device.type == "cuda":
            rows[method]["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        tmp.cleanup()
        print(f"{method:<12} {sec:.3f} s/step", flush=True)
    if "supervised" in rows:
        for r in rows.values():
            r["ratio_to_supervised"] = round(r["seconds_per_step"] / rows["supervised"]["seconds_per_step"], 2)
    result = {"recipe": args.recipe, "device": device_name(device),
              "amp": args.amp, "channels_last": args.channels_last, "steps": args.steps,
              "methods": rows, "torch": torch.__version__}
    write_result(result_name("method_step", args.recipe, device, args.amp, args.channels_last), result)


if __name__ == "__main__":
    main()
