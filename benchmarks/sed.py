"""SED-L labelling cost: images/s and peak memory of the real architecture at 768 x 768 with T = 171 concepts.

    python benchmarks/sed.py [--device cpu|cuda] [--precisions fp32 tf32 bf16] [--batches 1 4] [--images 4]

The released SED-L architecture (open_clip convnext_large_d_320 image tower + the 1.47 M-parameter
aggregator; `models/sed.py` SED_L) with random weights (the architecture sets the cost, not the weights) and
random unit text [171, 80, 768] (the sed_voc21 concept set's shape), on the real Pascal VOC samples of
../shared/data/voc_samples prepared exactly as `gen-pseudo --model sed` prepares them (`sed_input`). Times the
network plus SemiOVS's post-processing (sigmoid, resize to the image, max per class) after one warm-up batch.
With several precisions it also reports the label agreement of each with fp32 (random weights: a check of
numerics, not of SED's accuracy). JSON on stdout and in benchmarks/results/sed-<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from semiseg_cli.models.sed import SED, SED_L, sed_input
from semiseg_cli.models.text_embeddings import max_per_class
from train_step import device_name, write_result  # benchmarks/ is on sys.path when this script runs

SHARED = Path(os.environ.get("SEMISEG_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
GROUPS = [151] + [1] * 20  # sed_voc21: 151 background concepts, then one per VOC class


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", nargs="+", default=None, help="default: fp32 on the CPU, fp32 tf32 bf16 on a GPU")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 on the CPU, 1 4 on a GPU")
    ap.add_argument("--images", type=int, default=None, help="timed images per setting (default: 1 CPU, 16 GPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    precisions = args.precisions or (["fp32", "tf32", "bf16"] if gpu else ["fp32"])
    batches = args.batches or ([1, 4] if gpu else [1])
    n_images = args.images or (16 if gpu else 1)

    torch.manual_seed(0)
    model = SED(SED_L).to(device).eval()
    text = F.normalize(torch.randn(171, 80, 768), dim=-1).to(device)
    owner = torch.repeat_interleave(torch.arange(len(GROUPS)), torch.tensor(GROUPS)).to(device)
    samples = sorted((SHARED / "voc_samples").glob("*_image.png"))
    images = [Image.open(samples[i % len(samples)]).convert("RGB") for i in range(max(n_images, max(batches)))]
    inputs = [sed_input(img) for img in images]

    def label(batch_idx, precision):
        dtype = torch.bfloat16 if precision == "bf16" else None
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        x = torch.stack([inputs[i] for i in batch_idx]).to(device)
        with torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
            probs = model(x, text).float().sigmoid()
        out = []
        for p, i in zip(probs, batch_idx):
            up = F.interpolate(p[None], size=(images[i].height, images[i].width), mode="bilinear", align_corners=False)[0]
            out.append(max_per_class(up, owner, len(GROUPS), dim=0).argmax(0).cpu())
        if gpu:
            torch.cuda.synchronize(device)
        return out

    runs, labels = [], {}
    for precision in precisions:
        for b in batches:
            label(list(range(b)), precision)  # warm-up (cudnn autotuning, allocator)
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            got, start = [], time.perf_counter()
            for s in range(0, n_images, b):
                got += label([(s + j) % len(images) for j in range(b)], precision)
            seconds = time.perf_counter() - start
            n = len(got)
            run = {"precision": precision, "batch": b, "images": n, "seconds": round(seconds, 2),
                   "images_per_s": round(n / seconds, 3)}
            run["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if gpu else \
                round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # max RSS, KiB -> GiB
            labels[(precision, b)] = got
            runs.append(run)
            print(run, flush=True)
    for run in runs:
        ref = labels.get(("fp32", run["batch"]))
        if ref is not None and run["precision"] != "fp32":
            same = sum(int((a == r).sum()) for a, r in zip(labels[(run["precision"], run["batch"])], ref))
            run["label_agreement_vs_fp32"] = round(same / sum(r.numel() for r in ref), 5)
    result = {"benchmark": "sed", "device": device_name(device), "input": 768, "concepts": 171, "templates": 80,
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              "peak_memory": "torch.cuda.max_memory_allocated" if gpu else "process max RSS", "runs": runs}
    write_result(f"sed-{device.type}", result)


if __name__ == "__main__":
    main()
