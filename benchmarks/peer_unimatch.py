"""Speed of one UniMatch training iteration: our implementation vs the original UniMatch code, side by side.

    python benchmarks/peer_unimatch.py --unimatch-src DIR [--device cuda|cpu] [--batch 2] [--crop 321]
                                       [--rounds 5] [--amp bf16|off] [--channels-last [as-run|both|none]] [--threads N]
                                       [--cudnn-benchmark] [--profile [ours|ref|both]] [--tag TAG]

e.g. on a GPU (the original's per-GPU setting: 2 labeled + 2 unlabeled images, crop 321; the paper's
Pascal runs used 4 GPUs x 2):

    python benchmarks/peer_unimatch.py --unimatch-src /tmp/unimatch-src --device cuda --rounds 5
    python benchmarks/peer_unimatch.py --unimatch-src /tmp/unimatch-src --device cuda --amp bf16 --channels-last --tag bf16-cl
    python benchmarks/peer_unimatch.py --unimatch-src /tmp/unimatch-src --device cuda --profile both --tag profile

and a tiny CPU smoke run (seconds per step):

    python benchmarks/peer_unimatch.py --unimatch-src /tmp/unimatch-src --device cpu --batch 1 --crop 65 --rounds 1

where DIR is a checkout of https://github.com/LiheYoung/UniMatch (`git clone`, or `git archive HEAD model
configs | tar -x -C DIR` from a mirror). Nothing of the original is copied into this project: its model
(`model/semseg/deeplabv3plus.py`, `model/backbone/resnet.py`) and its Pascal config (`configs/pascal.yaml`)
are imported / read from DIR at run time.

What is measured, per implementation, is one full training iteration on random tensors already on the
device (data loading is not included; benchmarks/data_pipeline.py measures ours):
- ours: `semiseg_cli.methods.unimatch.train_step` on the `unimatch-voc-92` recipe's model (DeepLabV3+,
  timm `resnet101s` = ResNet-101 with the deep stem, output stride 16, `model.weights=null`), then
  zero_grad, backward, SGD step (engine/optim.py groups: backbone lr, head lr x 10);
- reference: `ref_step` below, the loop body of the original's `unimatch.py` written out here around the
  ORIGINAL model object: eval-mode no-grad forward of the mix source, in-place CutMix of both strong views,
  forward of cat(img_x, img_u_w) with need_fp=True, forward of cat(u_s1, u_s2), CE on labeled, per-pixel
  CE on the strong views and the FP output masked by confidence >= 0.95 and ignore != 255 (divided by the
  number of non-ignored pixels, `.item()` as the original does), loss = (x + 0.25 s1 + 0.25 s2 + 0.5 fp)/2,
  zero_grad, backward, SGD step (SGD lr 0.001, momentum 0.9, wd 1e-4, non-backbone lr x lr_multi 10).
  Not included: the original's DDP/SyncBatchNorm wrapper (one process here, plain BN), its barrier, its
  per-iteration logging `.item()`s and poly LR update (ours' trainer also logs/updates LR outside
  train_step; neither is timed).

Both models get the same weights (the reference's state dict is filled from ours, parameter by parameter,
which also checks that the two architectures have the same tensors in the same order), the same inputs
(same seed, same CutMix boxes, drawn as the original's `obtain_cutmix_box` with p = 1), the same optimizer
settings and the same autocast (--amp). The memory format is by default each one's own (ours NHWC, as our trainer
runs it with train.channels_last, also on the CPU; the original contiguous, as its code runs), or the same for
both with --channels-last both|none. The warm-up step of each is
run from the same RNG seed, so the two warm-up losses (printed) must agree up to float rounding: a check
that `ref_step` and our train_step compute the same thing. Then rounds alternate ours, ref, ours, ref ...;
each step is timed with perf_counter (CUDA: synchronised before and after; peak memory is
torch.cuda.max_memory_allocated with the peak reset before each step; both models and their optimizer
states are resident, so `peak_above_start_mib`, the peak minus what was allocated at the step's start, is
the step's own memory). Prints per-round times, the medians and the median per-round ratio ours/reference;
JSON in benchmarks/results/peer_unimatch-<device type>[-<tag>].json.

--profile runs torch.profiler on one more step of ours (or of the reference, or both) and prints the top 15
ops by self CPU time (CPU) or self device time (CUDA).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from semiseg_cli.config import load_config
from semiseg_cli.data.streams import fake_batch, key_kinds
from semiseg_cli.distributed import DistEnv
from semiseg_cli.engine.optim import build_optimizer
from semiseg_cli.engine.trainer import StepContext, load_method
from semiseg_cli.models import build_model
from train_step import sync, write_result  # benchmarks/ is on sys.path when this script runs

RECIPE = "unimatch-voc-92"


# ----------------------------------------------------------------------------------------------- original
@contextmanager
def _no_pretrained(resnet_module, arch: str):
    """The original's DeepLabV3Plus calls `resnet.__dict__[cfg['backbone']](pretrained=True, ...)`, which
    would torch.load('pretrained/resnet101.pth'); the constructor is swapped, for the duration of the
    build only, for one that forces pretrained=False (random init: this is a timing benchmark, and the
    weights are then overwritten with ours anyway)."""
    orig = getattr(resnet_module, arch)
    setattr(resnet_module, arch, lambda pretrained=False, **kw: orig(pretrained=False, **kw))
    try:
        yield
    finally:
        setattr(resnet_module, arch, orig)


def build_original(src: Path):
    """(model, its cfg) from the original checkout at `src` (model/semseg/deeplabv3plus.py and
    configs/pascal.yaml, imported and read from there)."""
    if not (src / "model" / "semseg" / "deeplabv3plus.py").is_file():
        sys.exit(f"--unimatch-src {src}: no model/semseg/deeplabv3plus.py there (a checkout of LiheYoung/UniMatch)")
    sys.path.insert(0, str(src))
    dl = importlib.import_module("model.semseg.deeplabv3plus")
    resnet = importlib.import_module("model.backbone.resnet")
    if not Path(dl.__file__).resolve().is_relative_to(src.resolve()):
        sys.exit(f"`model.semseg.deeplabv3plus` was imported from {dl.__file__}, not from {src}")
    cfg = yaml.safe_load((src / "configs" / "pascal.yaml").read_text())
    with _no_pretrained(resnet, cfg["backbone"]):
        model = dl.DeepLabV3Plus(cfg)
    return model, cfg


def original_optimizer(model, cfg):
    """The original's SGD: backbone at lr, every other parameter at lr x lr_multi (unimatch.py)."""
    head = [p for n, p in model.named_parameters() if "backbone" not in n]
    return torch.optim.SGD([{"params": model.backbone.parameters(), "lr": cfg["lr"]},
                            {"params": head, "lr": cfg["lr"] * cfg["lr_multi"]}],
                           lr=cfg["lr"], momentum=0.9, weight_decay=1e-4)


def ref_inputs(batch: dict) -> dict:
    """Our batch under the original's names. The original CutMixes img_u_s1/img_u_s2 in place (fresh
    tensors from its loader each iteration), so those two are cloned here, outside the timed step."""
    names = {"img_x": "x", "mask_x": "y", "img_u_w": "u_w", "img_u_s1": "u_s1", "img_u_s2": "u_s2",
             "ignore_mask": "ign", "cutmix_box1": "box1", "cutmix_box2": "box2", "img_u_w_mix": "u_w_mix",
             "img_u_s1_mix": "u_s1_mix", "img_u_s2_mix": "u_s2_mix", "ignore_mask_mix": "ign_mix"}
    t = {k: batch[v] for k, v in names.items()}
    t["img_u_s1"], t["img_u_s2"] = t["img_u_s1"].clone(), t["img_u_s2"].clone()
    return t


def ref_step(model, optimizer, t: dict, amp, conf_thresh: float) -> torch.Tensor:
    """One iteration of the original's unimatch.py loop body (see the module docstring)."""
    with amp:
        with torch.no_grad():
            model.eval()
            pred_u_w_mix = model(t["img_u_w_mix"]).detach()
            conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
            mask_u_w_mix = pred_u_w_mix.argmax(dim=1)

        img_u_s1, img_u_s2 = t["img_u_s1"], t["img_u_s2"]
        box1, box2 = t["cutmix_box1"], t["cutmix_box2"]
        m1, m2 = box1.unsqueeze(1).expand(img_u_s1.shape) == 1, box2.unsqueeze(1).expand(img_u_s2.shape) == 1
        img_u_s1[m1] = t["img_u_s1_mix"][m1]
        img_u_s2[m2] = t["img_u_s2_mix"][m2]

        model.train()
        num_lb, num_ulb = t["img_x"].shape[0], t["img_u_w"].shape[0]
        preds, preds_fp = model(torch.cat((t["img_x"], t["img_u_w"])), True)
        pred_x, pred_u_w = preds.split([num_lb, num_ulb])
        pred_u_w_fp = preds_fp[num_lb:]
        pred_u_s1, pred_u_s2 = model(torch.cat((img_u_s1, img_u_s2))).chunk(2)

        pred_u_w = pred_u_w.detach()
        conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
        mask_u_w = pred_u_w.argmax(dim=1)
        ign, ign_mix = t["ignore_mask"], t["ignore_mask_mix"]

        def mixed(box):  # targets of a CutMixed view: the mix source's inside the box
            m, c, i = mask_u_w.clone(), conf_u_w.clone(), ign.clone()
            b = box == 1
            m[b], c[b], i[b] = mask_u_w_mix[b], conf_u_w_mix[b], ign_mix[b]
            return m, c, i

        def masked_ce(pred, mask, conf, ignore):
            loss = F.cross_entropy(pred, mask, reduction="none")
            loss = loss * ((conf >= conf_thresh) & (ignore != 255))
            return loss.sum() / (ignore != 255).sum().item()

        loss_x = F.cross_entropy(pred_x, t["mask_x"], ignore_index=255)
        loss_u_s1 = masked_ce(pred_u_s1, *mixed(box1))
        loss_u_s2 = masked_ce(pred_u_s2, *mixed(box2))
        loss_u_w_fp = masked_ce(pred_u_w_fp, mask_u_w, conf_u_w, ign)
        loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's state dict from src's, tensor by tensor in order (names differ: timm's vs the original's);
    a different count or shape means the architectures differ, and stops the benchmark."""
    s, d = list(src.state_dict().items()), list(dst.state_dict().items())
    if len(s) != len(d):
        sys.exit(f"ours has {len(s)} state tensors, the original {len(d)}: the architectures differ")
    for (ns, ts), (nd, td) in zip(s, d):
        if ts.shape != td.shape:
            sys.exit(f"architectures differ: ours {ns} {tuple(ts.shape)} vs original {nd} {tuple(td.shape)}")
    dst.load_state_dict({nd: ts.clone() for (_, ts), (nd, _) in zip(s, d)})


# ---------------------------------------------------------------------------------------------- inputs
def cutmix_boxes(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, size, size] boxes with the original's obtain_cutmix_box distribution (area 2-40 %, aspect
    0.3-1/0.3), always drawn (p = 1) so every step mixes."""
    out = torch.zeros(n, size, size)
    for b in range(n):
        area = rng.uniform(0.02, 0.4) * size * size
        while True:
            ratio = rng.uniform(0.3, 1 / 0.3)
            w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
            x, y = rng.integers(0, size), rng.integers(0, size)
            if x + w <= size and y + h <= size:
                break
        out[b, y:y + h, x:x + w] = 1
    return out


def make_batch(loaders, n: int, crop: int, k: int, device, channels_last: bool, seed: int = 0) -> dict:
    batch = fake_batch(loaders, n=n, size=crop, num_classes=k, seed=seed, device="cpu", pad_rows=max(1, crop // 16))
    rng = np.random.default_rng(seed)
    for key in ("box1", "box2", "box1_mix", "box2_mix"):
        batch[key] = cutmix_boxes(n, crop, rng)
    kinds = key_kinds(loaders)
    for key, t in batch.items():
        t = t.to(device)
        if channels_last and kinds[key] == "image":
            t = t.contiguous(memory_format=torch.channels_last)
        batch[key] = t
    return batch


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unimatch-src", type=Path, required=True, help="a checkout of LiheYoung/UniMatch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=2, help="labeled images per step (as many unlabeled and mix-source)")
    ap.add_argument("--crop", type=int, default=321)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--channels-last", nargs="?", const="both", default="as-run", choices=["as-run", "both", "none"],
                    help="memory format: as-run (default): each as its own code trains, ours NHWC as our trainer's "
                         "train.channels_last (default true) does, the original contiguous; both / none: the same "
                         "for both (a bare --channels-last means both)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True for both (the original's unimatch.py sets it)")
    ap.add_argument("--profile", nargs="?", const="ours", default=None, choices=["ours", "ref", "both"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides of our recipe")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    ours_cl = args.channels_last == "both" or (args.channels_last == "as-run" and
                                               load_config(RECIPE, [])["train"]["channels_last"])
    ref_cl = args.channels_last == "both"
    fmt_ours = torch.channels_last if ours_cl else torch.contiguous_format
    fmt_ref = torch.channels_last if ref_cl else torch.contiguous_format

    # ours
    cfg = load_config(RECIPE, ["model.weights=null", f"train.global_batch={args.batch}",
                               f"train.crop_size={args.crop}", *args.set])
    k, conf_thresh = cfg["dataset"]["num_classes"], cfg["ssl"]["conf_thresh"]
    torch.manual_seed(0)
    ours = build_model(cfg).to(device, memory_format=fmt_ours)
    opt_ours = build_optimizer(cfg, ours)
    method = load_method("unimatch")
    env = DistEnv(device=device)

    # the original
    ref, ref_cfg = build_original(args.unimatch_src)
    for key, a, b in [("classes", ref_cfg["nclass"], k), ("lr", ref_cfg["lr"], cfg["optim"]["lr"]),
                      ("head lr multiplier", ref_cfg["lr_multi"], cfg["optim"]["lr_mult"]["head"]),
                      ("conf_thresh", ref_cfg["conf_thresh"], conf_thresh)]:
        if a != b:
            print(f"note: {key}: original {a}, ours {b}", flush=True)
    copy_weights(ours, ref)
    ref = ref.to(device, memory_format=fmt_ref)
    opt_ref = original_optimizer(ref, ref_cfg)
    n_params = [sum(p.numel() for p in m.parameters()) for m in (ours, ref)]

    batch = make_batch(method.LOADERS, args.batch, args.crop, k, device, ours_cl)
    ref_batch = make_batch(method.LOADERS, args.batch, args.crop, k, device, ref_cl)
    total = 1000

    def step_ours(i):
        with amp:
            loss, _ = method.train_step(ours, batch, StepContext(cfg, i, total, env, None))
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        return loss.detach()

    def timed(name, i):
        t = ref_inputs(ref_batch) if name == "ref" else None
        opt = opt_ref if name == "ref" else opt_ours
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = ref_step(ref, opt_ref, t, amp, ref_cfg["conf_thresh"]) if name == "ref" else step_ours(i)
        sync(device)
        sec = time.perf_counter() - t0
        mem = None
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
            mem = (peak / 2**20, (peak - start_mem) / 2**20)
        opt.zero_grad(set_to_none=True)  # free this model's grads so they do not count in the other's peak
        return sec, mem, loss

    print(f"device {device_name(device)}, torch {torch.__version__}, batch {args.batch}+{args.batch}, crop "
          f"{args.crop}, amp {args.amp}, channels_last ours {ours_cl} original {ref_cl}, params ours {n_params[0] / 1e6:.2f}M "
          f"original {n_params[1] / 1e6:.2f}M", flush=True)
    warm = {}
    for name in ("ours", "ref"):  # warm-up, from the same RNG state (FP dropout masks): losses must agree
        torch.manual_seed(1)
        sec, _, loss = timed(name, 0)
        warm[name] = (sec, loss.item())
    diff = abs(warm["ours"][1] - warm["ref"][1])
    print(f"warm-up  ours {warm['ours'][0]:.3f} s  ref {warm['ref'][0]:.3f} s   loss ours {warm['ours'][1]:.6f} "
          f"ref {warm['ref'][1]:.6f} (|diff| {diff:.2e})", flush=True)

    times = {"ours": [], "ref": []}
    peaks = {"ours": [], "ref": []}
    for r in range(args.rounds):
        for name in ("ours", "ref"):
            sec, mem, _ = timed(name, r + 1)
            times[name].append(sec)
            if mem:
                peaks[name].append(mem)
        print(f"round {r + 1}: ours {times['ours'][-1]:.3f} s  ref {times['ref'][-1]:.3f} s  "
              f"ratio {times['ours'][-1] / times['ref'][-1]:.3f}", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = statistics.median([a / b for a, b in zip(times["ours"], times["ref"])])
    print(f"median: ours {med['ours']:.3f} s/step, ref {med['ref']:.3f} s/step, median ratio ours/ref {ratio:.3f}")
    peak_json = None
    if device.type == "cuda":
        peak_json = {n: {"peak_mib": round(max(p[0] for p in v), 1), "peak_above_start_mib": round(max(p[1] for p in v), 1)}
                     for n, v in peaks.items()}
        print("peak memory: " + ", ".join(f"{n} {v['peak_mib']} MiB ({v['peak_above_start_mib']} above start)"
                                          for n, v in peak_json.items()))

    if args.profile:
        for name in (["ours", "ref"] if args.profile == "both" else [args.profile]):
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if device.type == "cuda" else [])
            t = ref_inputs(ref_batch) if name == "ref" else None
            sync(device)
            with torch.profiler.profile(activities=acts) as prof:
                ref_step(ref, opt_ref, t, amp, ref_cfg["conf_thresh"]) if name == "ref" else step_ours(0)
                sync(device)
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\nprofile of one step of {name} (top 15 by {key}):")
            print(prof.key_averages().table(sort_by=key, row_limit=15))

    result = {"benchmark": "peer_unimatch", "recipe": RECIPE, "device": device_name(device),
              "torch": torch.__version__, "batch": args.batch, "crop": args.crop, "rounds": args.rounds,
              "amp": args.amp, "channels_last": {"ours": ours_cl, "ref": ref_cl}, "cudnn_benchmark": args.cudnn_benchmark,
              "threads": torch.get_num_threads(), "params_m": {"ours": round(n_params[0] / 1e6, 3),
                                                               "ref": round(n_params[1] / 1e6, 3)},
              "warmup_loss": {"ours": warm["ours"][1], "ref": warm["ref"][1]},
              "times_s": {n: [round(x, 4) for x in v] for n, v in times.items()},
              "median_s": {n: round(v, 4) for n, v in med.items()},
              "median_ratio_ours_to_ref": round(ratio, 4), "peak_memory": peak_json,
              "unimatch_src": str(args.unimatch_src)}
    write_result(f"peer_unimatch-{device.type}" + (f"-{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
