"""gen-pseudo throughput (images/s) of a checkpoint of a recipe's model, through the real labeler and writer.

    python benchmarks/gen_pseudo.py [--recipe supervised-voc-92] [--images N] [--batch-size 4] [--device cuda]

Builds the recipe's model with random weights (the architecture sets the cost, not the weights), saves it as a
semiseg checkpoint, and labels the real Pascal VOC samples of ../shared/data/voc_samples (repeated to N
images, all of one size so they batch) with `--save-conf --save-scores`, as `semiseg gen-pseudo --model
checkpoint` does. JSON on stdout and in benchmarks/results/gen_pseudo-<recipe>-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from semiseg_cli.config import load_config
from semiseg_cli.distributed import DistEnv
from semiseg_cli.models import build_model
from semiseg_cli.pseudo import build_labeler
from semiseg_cli.pseudo.writer import generate
from train_step import device_name, write_result  # benchmarks/ is on sys.path when this script runs

SHARED = Path(os.environ.get("SEMISEG_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="supervised-voc-92")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=[500, 375], help="W H every sample is resized to")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = load_config(args.recipe, ["model.weights=null", "train.workers=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"model": model.state_dict(), "config": cfg}, tmp / "best.pt")
        samples = sorted((SHARED / "voc_samples").glob("*_image.png"))
        (tmp / "images").mkdir()
        for i in range(args.images):
            Image.open(samples[i % len(samples)]).convert("RGB").resize(tuple(args.size)).save(tmp / "images" / f"{i:05d}.png")
        labeler = build_labeler("checkpoint", {"checkpoint": tmp / "best.pt"}, device)
        env = DistEnv(device=device)
        generate(labeler, tmp / "images", tmp / "warm", env, batch_size=args.batch_size)  # warm-up (one pass)
        start = time.time()
        summary = generate(labeler, tmp / "images", tmp / "out", env, save_conf=True, save_scores=True,
                           batch_size=args.batch_size)
        seconds = time.time() - start
    result = {"recipe": args.recipe, "device": device_name(device), "images": summary["written"],
              "image_size": args.size, "batch_size": args.batch_size, "eval_mode": cfg["eval"]["mode"],
              "seconds": round(seconds, 2), "images_per_s": round(summary["written"] / seconds, 3)}
    write_result(f"gen_pseudo-{args.recipe}-{device.type}", result)


if __name__ == "__main__":
    main()
