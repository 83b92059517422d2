"""Throughput of the unlabeled training pipeline (weak view + two strong views + CutMix boxes, crop 321),
the heaviest per-sample work of UniMatch-style methods, with 0, 1 and 2 DataLoader workers.

Input: the 14 real Pascal VOC val images of ../shared/data/voc_samples (513x513), cycled.
Output: JSON on stdout and in benchmarks/results/data_pipeline.json.

    python benchmarks/data_pipeline.py [--images 112] [--workers 0 1 2] [--crop 321]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from semiseg_cli.data.dataset import SegDataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEMISEG_SHARED", REPO.parent / "shared")) / "data" / "voc_samples"


def measure(workers: int, n: int, crop: int, batch: int = 8) -> float:
    items = [(p.name, None) for p in sorted(SHARED.glob("*_image.png"))]
    ds = SegDataset(SHARED, items, "train_u", num_classes=21, crop_size=crop)
    keys = [(0, i % len(items)) for i in range(n)]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=keys, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    start, count = time.perf_counter(), batch
    for b in it:
        count += b[0].shape[0]
    return (count - batch) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=112)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--crop", type=int, default=321)
    args = ap.parse_args()
    result = {"benchmark": "unlabeled pipeline (u_w, u_s1, u_s2, ign, box1, box2)", "crop": args.crop,
              "images": args.images, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "images_per_s": {str(w): round(measure(w, args.images, args.crop), 1) for w in args.workers}}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
