"""The one training loop, shared by every method.

A method module (semiseg_cli/methods/<name>.py) provides `LOADERS` (which batches it needs) and
`train_step(model, batch, ctx) -> (loss, logs)`; this loop owns data, optimizer, LR schedule, AMP, DDP,
evaluation, checkpoints and logging. A method that keeps state across steps also provides
`make_state(cfg, model, out, env)`; train_step reads the object it returns as `ctx.state`. The object may
have `state_dict()` / `load_state_dict()` (saved in and restored from the checkpoint) and
`after_eval(model, improved, iteration)` (called after each evaluation, before the checkpoint is written).

Launch:
    1 process (CPU or 1 GPU):  semiseg train --recipe unimatch-voc-92
    1 node, 4 GPUs:            torchrun --nproc_per_node=4 -m semiseg_cli train --recipe unimatch-voc-92
    2 nodes x 4 GPUs:          torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
                                 --rdzv_endpoint=HOST:29500 --rdzv_id=job1 -m semiseg_cli train --recipe ...
`train.global_batch` is the batch over all processes; each process takes global_batch / world_size.
"""
from __future__ import annotations

import importlib
import json
import math
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg_cli import __version__
from semiseg_cli.config import dump
from semiseg_cli.console import err, progress
from semiseg_cli.data.dataset import build_dataset
from semiseg_cli.data.transforms import normalize
from semiseg_cli.engine.checkpoint import load_checkpoint, save_atomic
from semiseg_cli.engine.distributed import DistEnv, barrier, cleanup, init_distributed
from semiseg_cli.engine.evaluate import autocast_for, evaluate
from semiseg_cli.errors import UserError
from semiseg_cli.methods import METHODS
from semiseg_cli.models import build_model

# names of the tensors each loader yields, in order (legend in semiseg_cli/data/dataset.py)
BATCH_KEYS = {
    "labeled": ("x", "y"),
    "unlabeled": ("u_w", "u_s1", "u_s2", "ign", "box1", "box2"),
    "unlabeled_mix": ("u_w_mix", "u_s1_mix", "u_s2_mix", "ign_mix", "box1_mix", "box2_mix"),
}
IMAGE_KEYS = {"x", "u_w", "u_s1", "u_s2", "u_w_mix", "u_s1_mix", "u_s2_mix"}


@dataclass
class StepContext:
    """What a method's train_step may read besides the batch."""
    cfg: dict
    iteration: int
    total: int
    env: DistEnv
    state: object = None  # what the method's optional make_state() built (PrevMatch's pool, S4MC's E_c)


def load_method(name: str):
    return importlib.import_module(METHODS[name])


def per_process_batch(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise UserError(f"train.global_batch = {global_batch} does not divide over {world} processes; "
                        f"use a multiple of {world} (the LR is never rescaled silently)")
    return global_batch // world


def epoch_keys(length: int, seed: int, epoch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This process's sample keys (epoch, position) for one epoch: a seeded permutation of `length`
    positions, padded by wrapping so it divides by world, then every world-th from `rank`
    (DistributedSampler's rule).

    A position indexes the epoch's list, which is the dataset tiled to `length` when it is shorter (as
    UniMatch tiles the labeled list to the unlabeled length); SegDataset reads item position % len and
    seeds the augmentation with the position, so the ~N_u/N_l copies of a labeled image in one epoch get
    different crops, as UniMatch's fresh random draws do. (Seeding with the item index gave all copies
    the same crop: the SSL methods then saw each labeled image in one augmentation per epoch, 15x fewer
    than supervised training on 64 of 1016 synthetic images, and overfitted them.)"""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(length, generator=g).tolist()
    order += order[: (-length) % world]
    return [(epoch, i) for i in order[rank::world]]


class RunSampler(torch.utils.data.Sampler):
    """The keys of iterations [start, total) of one process, epoch after epoch, as one stream.

    Each epoch contributes exactly iters_per_epoch x batch keys (drop_last), so batch i of the stream is
    iteration start + i. One DataLoader then serves the whole run (its workers start once, which matters
    when an epoch is a handful of iterations), and a resumed run continues mid-epoch at the same key.
    """

    def __init__(self, epoch_len: int, seed: int, env: DistEnv, batch: int, iters_per_epoch: int,
                 start: int, total: int):
        self.epoch_len, self.seed = epoch_len, seed
        self.env, self.batch, self.ipe, self.start, self.total = env, batch, iters_per_epoch, start, total

    def __len__(self) -> int:
        return (self.total - self.start) * self.batch

    def __iter__(self):
        it = self.start
        while it < self.total:
            epoch, offset = divmod(it, self.ipe)
            n = min(self.ipe - offset, self.total - it)
            keys = epoch_keys(self.epoch_len, self.seed, epoch, self.env.rank, self.env.world)
            yield from keys[offset * self.batch:(offset + n) * self.batch]
            it += n


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """One parameter group per top-level child module, with LR = optim.lr x optim.lr_mult[child]
    (default 1). Frozen parameters are left out."""
    o = cfg["optim"]
    groups = []
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if params:
            mult = o["lr_mult"].get(name, 1.0)
            groups.append({"params": params, "name": name, "lr": o["lr"] * mult, "lr_mult": mult})
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])


def poly_lr(cfg: dict, it: int, total: int) -> float:
    """lr_t = lr (1 - t/T)^power; step 0 uses the base LR (UniMatch sets the LR of step t from t)."""
    return cfg["optim"]["lr"] * (1 - it / total) ** cfg["optim"]["poly_power"]


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunLog:
    """log.jsonl + TensorBoard, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.file = open(out / "log.jsonl", "a")
            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "iter":
                self.tb.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def prepare_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"{out / 'last.pt'}: nothing to resume; start without --resume")
    elif (out / "last.pt").exists():
        raise UserError(f"{out} already holds a run (last.pt); pass --resume to continue it or --out for a new folder")
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: dict, out: str | Path, resume: bool = False) -> dict:
    """Train `cfg` into run folder `out`; with `resume`, continue exactly where out/last.pt stopped.

    Returns the last evaluation's metrics.
    """
    out = Path(out)
    env = init_distributed()
    try:
        return _train(cfg, out, resume, env)
    finally:
        cleanup()


def _train(cfg: dict, out: Path, resume: bool, env: DistEnv) -> dict:
    if env.is_main:
        prepare_run_dir(out, resume)
    barrier()
    ckpt = load_checkpoint(out / "last.pt") if resume else None
    tr = cfg["train"]
    method = load_method(cfg["method"])
    per_gpu = per_process_batch(tr["global_batch"], env.world)
    _seed(tr["seed"] + env.rank)
    model = build_model(cfg).to(env.device)  # before the datasets: a wrong weights file fails fast

    datasets = {"val": build_dataset(cfg, "val")}
    for name in method.LOADERS:
        kind = "labeled" if name == "labeled" else "unlabeled"
        datasets[name] = build_dataset(cfg, kind)
        if name == "unlabeled_mix":  # same images and order, independent augmentation (UniMatch)
            datasets[name].seed += 1
    epoch_len = len(datasets["unlabeled"] if "unlabeled" in datasets else datasets["labeled"])
    iters_per_epoch = math.ceil(epoch_len / env.world) // per_gpu
    if iters_per_epoch == 0:
        raise UserError(f"the split has {epoch_len} training images, fewer than one batch of {per_gpu} per process")
    total = tr["iters"] or tr["epochs"] * iters_per_epoch
    eval_every = tr["eval_every"] if tr["iters"] else tr["eval_every"] * iters_per_epoch

    cuda = env.device.type == "cuda"
    if cuda and tr["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cuda and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN only on CUDA with several processes
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and tr["amp"] == "fp16")
    start, best = 0, -1.0
    method_state = method.make_state(cfg, model, out, env) if hasattr(method, "make_state") else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best = ckpt["iteration"], ckpt["best_miou"]
        if hasattr(method_state, "load_state_dict") and ckpt.get("method_state") is not None:
            method_state.load_state_dict(ckpt["method_state"])
        _set_rng_state(ckpt["rng"][env.rank] if env.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    net = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if cuda else None,
                                                  broadcast_buffers=False)

    if env.is_main:
        run_info = {"version": __version__, "git_sha": git_sha(), "world_size": env.world, "per_gpu_batch": per_gpu,
                    "global_batch": tr["global_batch"], "total_iters": total, "iters_per_epoch": iters_per_epoch,
                    "device": str(env.device)}
        (out / "config.yaml").write_text(dump({**cfg, "_run": run_info}))
        err.print(f"training {cfg['method']} on {cfg['dataset']['name']}/{cfg['dataset']['split']}: {total} iterations "
                  f"({iters_per_epoch}/epoch), {env.world} process(es) x batch {per_gpu}, device {env.device}"
                  + (f", resuming at {start}" if start else ""))
    log = RunLog(out, env.is_main)
    amp = autocast_for(cfg, env)
    result: dict = {}
    sums: dict[str, torch.Tensor] = {}
    n_logged, nonfinite, t0, it = 0, torch.zeros((), dtype=torch.bool, device=env.device), time.time(), start

    def check_finite(weights: bool = False):
        # the loss flag is accumulated on the device (no sync per step); before a checkpoint the weights
        # are checked too, since a finite loss can still produce an update that overflows
        if weights:
            tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # BN statistics too
            nonfinite.logical_or_(~torch.stack([t.isfinite().all() for t in tensors]).all())
        if bool(nonfinite):
            good = f"{out / 'last.pt'} (iteration {saved_iter})" if saved_iter else "none yet"
            raise UserError(f"the loss became non-finite before iteration {it}; stopped. Last good checkpoint: {good}. "
                            "Try a lower optim.lr or train.amp=bf16")

    saved_iter = start
    loaders = [torch.utils.data.DataLoader(
        datasets[name], batch_size=per_gpu, num_workers=tr["workers"], pin_memory=cuda, generator=torch.Generator(),
        sampler=RunSampler(epoch_len, tr["seed"], env, per_gpu, iters_per_epoch, start, total))
        for name in method.LOADERS]
    batches = zip(*loaders)
    if err.is_terminal:  # a live bar on a terminal; the log lines below are printed above it
        batches = progress(batches, total=total - start, desc="train")
    for parts in batches:
        epoch = it // iters_per_epoch
        batch = {}
        for name, tensors in zip(method.LOADERS, parts):
            for key, t in zip(BATCH_KEYS[name], tensors):
                t = t.to(env.device, non_blocking=True)
                if key in IMAGE_KEYS:
                    t = normalize(t)
                    t = t.contiguous(memory_format=torch.channels_last) if cuda and tr["channels_last"] else t
                batch[key] = t
        lr = poly_lr(cfg, it, total)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        with amp:
            loss, logs = method.train_step(net, batch, StepContext(cfg, it, total, env, method_state))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        nonfinite |= ~torch.isfinite(loss.detach())
        for k, v in {"loss": loss.detach(), **logs}.items():
            sums[k] = sums.get(k, 0) + v.float()
        n_logged += 1
        it += 1

        if it % tr["log_every"] == 0 or it == total:
            check_finite()
            rec = {"iter": it, "epoch": epoch, "lr": lr, **{k: round(float(v) / n_logged, 5) for k, v in sums.items()},
                   "it_per_s": round(n_logged / (time.time() - t0), 3)}
            log.write(rec)
            if env.is_main:
                err.print(" ".join(f"{k} {v}" for k, v in rec.items()), markup=False)
            sums, n_logged, t0 = {}, 0, time.time()
        if it % eval_every == 0 or it == total:
            check_finite(weights=True)
            result = evaluate(net.module if env.world > 1 else model, cfg, datasets["val"], env,
                              workers=min(tr["workers"], 2))
            rng = _gather_rng(env)
            improved = result["miou"] > best  # the metrics are all-reduced: every process agrees
            best = max(best, result["miou"])
            if hasattr(method_state, "after_eval"):
                method_state.after_eval(model, improved, it)
            if env.is_main:
                log.write({"iter": it, "epoch": epoch, "miou": result["miou"], "best_miou": best,
                           "miou_paper": result["miou_paper"], "pixel_acc": result["pixel_acc"]})
                err.print(f"eval @ {it}: mIoU {result['miou']:.2f} (best {best:.2f})")
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "iteration": it, "best_miou": best, "rng": rng,
                         "method_state": method_state.state_dict() if hasattr(method_state, "state_dict") else None,
                         "config": cfg, "version": __version__}
                save_atomic(checkpoint, out / "last.pt")
                if improved:
                    save_atomic(checkpoint, out / "best.pt")
                (out / "eval.json").write_text(json.dumps({**result, "iter": it, "best_miou": best}, indent=2))
            saved_iter = it
            barrier()
    log.close()
    return result


def _gather_rng(env: DistEnv) -> list:
    """RNG states of every process (dropout streams differ per rank), gathered on rank 0."""
    import torch.distributed as dist

    state = _rng_state()
    if env.world == 1:
        return [state]
    states = [None] * env.world
    dist.all_gather_object(states, state)
    return states
