"""Supervised training-step and evaluation throughput of a recipe's model (random input, real modules).

    python benchmarks/train_step.py --recipe supervised-synthetic [--steps 10] [--batch 8] [--device cuda] [--amp bf16]

Reports images/s of a full training step (forward, backward, SGD step), peak memory (CUDA: allocated;
CPU: process max RSS), and images/s of whole-image evaluation at the eval size. JSON on stdout and in
benchmarks/results/train_step-<recipe>-<device>[-<amp>][-cl].json.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from semiseg_cli.config import load_config
from semiseg_cli.engine.optim import build_optimizer
from semiseg_cli.models import build_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def result_name(kind: str, recipe: str, device, amp: str, channels_last: bool) -> str:
    """<kind>-<recipe>-<device type>[-<amp>][-cl]: one file per variant, so variants do not overwrite."""
    return f"{kind}-{recipe}-{device.type}" + (f"-{amp}" if amp != "off" else "") + ("-cl" if channels_last else "")


def write_result(name: str, result: dict) -> None:
    """benchmarks/results/<name>.json, and the JSON on stdout."""
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="supervised-synthetic")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: the recipe's global batch)")
    ap.add_argument("--eval-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()

    cfg = load_config(args.recipe, ["model.weights=null"])
    device = torch.device(args.device)
    model = build_model(cfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    b, crop, k = args.batch or cfg["train"]["global_batch"], cfg["train"]["crop_size"], cfg["dataset"]["num_classes"]
    x = torch.randn(b, 3, crop, crop, device=device)
    y = torch.randint(0, k, (b, crop, crop), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "off")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with amp:
            loss = F.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up (allocator, kernels)
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    train_ips = b * args.steps / (time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20

    h, w = args.eval_size or (crop, crop)
    model.eval()
    xe = torch.randn(1, 3, h, w, device=device)
    with torch.no_grad(), amp:
        model(xe)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            model(xe).argmax(1)
        sync(device)
    eval_ips = args.steps / (time.perf_counter() - t)

    result = {"recipe": args.recipe, "device": device_name(device),
              "backbone": cfg["model"]["backbone"], "head_channels": cfg["model"]["head_channels"],
              "batch": b, "crop": crop, "amp": args.amp, "channels_last": args.channels_last,
              "train_images_per_s": round(train_ips, 2), "peak_memory_mib": round(peak, 1),
              "eval_size": [h, w], "eval_images_per_s": round(eval_ips, 2), "torch": torch.__version__}
    write_result(result_name("train_step", args.recipe, device, args.amp, args.channels_last), result)


if __name__ == "__main__":
    main()
