"""The one training loop, shared by every method.

A method module (semiseg_cli/methods/<name>.py, contract in methods/__init__.py) names its data streams in
`LOADERS` (data/streams.py) and provides `train_step(model, batch, ctx) -> (loss, logs)`; this loop owns
data, optimizer, LR schedule (engine/optim.py), AMP, DDP, evaluation, checkpoints and logging.

Launch:
    1 process (CPU or 1 GPU):  semiseg train --recipe unimatch-voc-92
    1 node, 4 GPUs:            torchrun --nproc_per_node=4 -m semiseg_cli train --recipe unimatch-voc-92
    2 nodes x 4 GPUs:          torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
                                 --rdzv_endpoint=HOST:29500 --rdzv_id=job1 -m semiseg_cli train --recipe ...
`train.global_batch` is the batch over all processes; each process takes global_batch / world_size.

Interrupts: in one process, SIGINT / SIGTERM take effect at the next iteration boundary, where last.pt is
saved (`_StopAtBoundary`); the CLI then exits with 130 / 143. Under torchrun they stop at once (a rank may
be inside a collective), keeping the last periodic last.pt. `--resume` refuses a changed schedule (total
iterations) and does nothing for a finished run.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg_cli import __version__
from semiseg_cli.config import absolute_paths, dump
from semiseg_cli.console import err, progress
from semiseg_cli.data.dataset import build_dataset, build_stream
from semiseg_cli.data.streams import STREAMS, epoch_stream, independent_order, key_kinds, stream_index
from semiseg_cli.data.transforms import normalize
from semiseg_cli.distributed import DistEnv, barrier, cleanup, init_distributed
from semiseg_cli.engine.checkpoint import check_fits, load_checkpoint
from semiseg_cli.engine.evaluate import autocast_for, evaluate
from semiseg_cli.engine.optim import build_optimizer, lr_at, set_lr
from semiseg_cli.errors import (Interrupted, UserError, check_output_dir, expect_workers_to_die, signal_in_forked_child,
                                 writing)
from semiseg_cli.io import leftover_temps, save_atomic, state_checksum, write_text_atomic
from semiseg_cli.methods import METHODS
from semiseg_cli.models import build_model
from semiseg_cli.plot import write_results_csv

__all__ = ["train", "StepContext", "RunSampler", "build_optimizer", "load_method"]


@dataclass
class StepContext:
    """What a method's train_step may read besides the batch."""
    cfg: dict
    iteration: int
    total: int
    env: DistEnv
    state: object = None  # what the method's optional make_state() built (PrevMatch's pool, S4MC's E_c)
    epoch: int = 0
    scale: object = None  # the GradScaler's scale, for a method that backpropagates itself (OWN_BACKWARD)


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

    Each stream maps a position to its item (data/streams.py); SegDataset seeds the augmentation with the
    position, so the copies of a tiled labeled image in one epoch get different crops, as UniMatch's fresh
    random draws do (tests/test_data.py shows why that matters)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(length, generator=g).tolist()
    order += order[: (-length) % world]
    return [(epoch, i) for i in order[rank::world]]


class RunSampler(torch.utils.data.Sampler):
    """The keys (epoch, position, index) of iterations [start, total) of one process for one stream, epoch
    after epoch, as one stream of keys.

    Each epoch contributes exactly iters_per_epoch x batch keys (drop_last), so batch i of the stream is
    iteration start + i. One DataLoader then serves the whole run (its workers start once, which matters
    when an epoch is a handful of iterations), and a resumed run continues mid-epoch at the same key.
    Positions come from `epoch_keys` (shared by all streams of a run); `index` is the item the stream's
    visiting rule picks among its `items` (data/streams.py `stream_index`); without `items` the keys are
    (epoch, position) and the dataset tiles (position % its length).
    """

    def __init__(self, epoch_len: int, seed: int, env: DistEnv, batch: int, iters_per_epoch: int,
                 start: int, total: int, items: int | None = None, stream_seed: int | None = None,
                 own_order: bool = False):
        self.epoch_len, self.seed = epoch_len, seed
        self.env, self.batch, self.ipe, self.start, self.total = env, batch, iters_per_epoch, start, total
        self.items, self.own_order = items, own_order
        self.stream_seed = seed if stream_seed is None else stream_seed

    def __len__(self) -> int:
        return (self.total - self.start) * self.batch

    def __iter__(self):
        it = self.start
        while it < self.total:
            epoch, offset = divmod(it, self.ipe)
            n = min(self.ipe - offset, self.total - it)
            keys = epoch_keys(self.epoch_len, self.seed, epoch, self.env.rank, self.env.world)
            for e, p in keys[offset * self.batch:(offset + n) * self.batch]:
                yield (e, p) if self.items is None else (e, p, stream_index(e, p, self.epoch_len, self.items,
                                                                               self.stream_seed, self.own_order))
            it += n


def stream_sampler(ds, name: str, cfg: dict, env: DistEnv, per_gpu: int, iters_per_epoch: int, start: int, total: int,
                   epoch_len: int) -> RunSampler:
    """The sampler of stream `name`'s dataset: the run's shared positions, each process taking its share; a
    dataset that already is this process's share (tar shards under torchrun: `per_process`) is sampled alone
    over its own items, its epoch being the smallest process's share."""
    seed = cfg["train"]["seed"]
    if getattr(ds, "per_process", False):
        return RunSampler(epoch_len // env.world, seed, DistEnv(device=env.device), per_gpu, iters_per_epoch, start,
                          total, items=ds.local, stream_seed=ds.seed)
    return RunSampler(epoch_len, seed, env, per_gpu, iters_per_epoch, start, total, items=len(ds), stream_seed=ds.seed,
                      own_order=independent_order(cfg, name))


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
    """log.jsonl + TensorBoard (when the `tensorboard` package is installed: `pip install semiseg[tensorboard]`),
    written by rank 0 only, and the running means of the logged values.

    Each value is averaged over the steps that reported it (PrevMatch's loss_prev exists only once its pool
    holds a model), not over all steps of the window."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.t0 = 0, time.time()
        self.tb = None
        self.path = out / "log.jsonl"
        if enabled:
            with writing(self.path, atomic=False):
                self.file = open(self.path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                err.print("note: no TensorBoard events (pip install tensorboard); log.jsonl has every value")
            else:
                self.tb = SummaryWriter(str(out / "tb"))

    def add(self, values: dict) -> None:
        """Accumulate one step's values (device tensors: no host sync until `means`)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def means(self) -> dict:
        """The window's means and speed; starts a new window."""
        rec = {k: round(float(v) / self.counts[k], 5) for k, v in self.sums.items()}
        rec["it_per_s"] = round(self.steps / (time.time() - self.t0), 3)
        self.sums, self.counts, self.steps, self.t0 = {}, {}, 0, time.time()
        return rec

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path, atomic=False):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for k, v in record.items():
            if self.tb is not None and isinstance(v, (int, float)) and k != "iter":
                self.tb.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        if self.enabled and not self.file.closed:
            with contextlib.suppress(OSError):  # a full disk was reported already
                self.file.close()
            if self.tb is not None:
                self.tb.close()


def prepare_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"{out / 'last.pt'}: nothing to resume; start without --resume")
    elif (out / "last.pt").exists():
        raise UserError(f"{out} already holds a run (last.pt); pass --resume to continue it or --out for a new folder")
    out.mkdir(parents=True, exist_ok=True)


LOCK = ".lock"


class RunLock:
    """OUT/.lock while a run trains there, so one run folder has one writer: JSON {pid, host, started},
    created atomically (O_CREAT | O_EXCL) and removed when training ends, also on errors and Ctrl-C.

    A lock whose process is gone (same host, no such pid: a killed run) is taken over with a warning; a
    live holder, or one on another host (whose pid cannot be checked), is a UserError naming pid@host."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover can race another process's; then look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(self._read())
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
            return self
        raise UserError(f"{self.path}: could not take the run lock (another process keeps taking it)")

    def _read(self) -> dict | None:
        """The holder's record; None if the file vanished meanwhile. A holder writes it right after
        creating the file, so an empty or partial one is read again for a moment before giving up."""
        for _ in range(20):
            try:
                holder = json.loads(self.path.read_text())
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return holder
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise UserError(f"{self.path}: unreadable run lock; if no run is training in {self.path.parent}, delete it")

    def _take_over_if_stale(self, holder: dict | None) -> None:
        if holder is None:
            return
        who = f"{holder['pid']}@{holder.get('host', '?')}"
        if holder.get("host") == self.mine["host"] and not _alive(holder["pid"]):
            err.print(f"warning: {self.path}: taking over the lock of process {who}, which is gone "
                      f"(started {holder.get('started', '?')})", markup=False, soft_wrap=True)
            # unlink only if it still is that stale lock (narrows the race with a concurrent taker)
            if self._read() == holder:
                self.path.unlink(missing_ok=True)
            return
        raise UserError(f"{self.path.parent} is in use by another training run (process {who}, started "
                        f"{holder.get('started', '?')}); wait for it, stop it, or train into another --out "
                        f"(delete {self.path} if that run is gone)")

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.mine["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_leftover_temps(out: Path) -> None:
    """Delete temp files of atomic writes that a killed process left in the run folder (under the lock,
    nobody else writes there)."""
    for tmp in leftover_temps(out):
        tmp.unlink(missing_ok=True)
        err.print(f"warning: removed {tmp}, left over from an interrupted write", markup=False, soft_wrap=True)


def train(cfg: dict, out: str | Path, resume: bool = False) -> dict:
    """Train `cfg` into run folder `out`; with `resume`, continue exactly where out/last.pt stopped.

    Returns the last evaluation's metrics ({} when a resumed run was already finished). SIGINT / SIGTERM raise
    errors.Interrupted (a BaseException, not a KeyboardInterrupt), in one process after saving last.pt.
    """
    started = time.time()
    out = Path(out).absolute()
    cfg = absolute_paths(cfg)  # what the run stores and prints means the same files from any folder
    check_output_dir(out)
    env = init_distributed()
    try:
        # rank 0 alone writes the run folder, so it alone takes the lock (before prepare_run_dir, so that
        # a live run is reported as such rather than as "already holds a run")
        with RunLock(out) if env.is_main else contextlib.nullcontext():
            run = _setup(cfg, out, resume, env)
            if run is None:  # resumed a finished run
                return {}
            result = _loop(run)
            if env.is_main:
                _summary(run, time.time() - started)
            return result
    finally:
        cleanup()


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _summary(run: "Run", seconds: float) -> None:
    """The end-of-training lines on stderr: time, best mIoU, the checkpoints, the next command."""
    resumed = f" (resumed at {run.start})" if run.start else ""
    at = f" at iteration {run.best_iter}" if run.best_iter else ""  # unknown in checkpoints older than best_iter
    err.print(f"done: {run.total - run.start} iterations in {_duration(seconds)}{resumed}; best mIoU {run.best:.2f}{at}",
              markup=False)
    best = f"iteration {run.best_iter}" if run.best_iter else "best"
    err.print(f"checkpoints: {run.out / 'best.pt'} ({best}), {run.out / 'last.pt'} (iteration {run.total})", markup=False)
    err.print(f"next: semiseg eval --run {run.out}", markup=False)


class _StopAtBoundary:
    """Defers SIGINT / SIGTERM to the next iteration boundary (`signum` is then set), so that the loop can
    save a last.pt that belongs to one iteration: raised mid-step (between the parameter groups of
    optimizer.step, during a save) an interrupt would leave weights of no iteration. A second signal stops
    at once (a step or an evaluation that hangs).

    Only in one process and the main thread (signal handlers live there); under torchrun the interrupt is
    not deferred, since a rank that stops at its boundary leaves the others waiting in a collective."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None

    def __enter__(self) -> "_StopAtBoundary":
        if self.enabled:
            self.pid = os.getpid()
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
            self.previous[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)  # see expect_workers_to_die
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker of an evaluation
            return signal_in_forked_child(signum)
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        expect_workers_to_die()
        # os.write, not print: a handler may run in the middle of a print to stderr
        os.write(2, b"stopping after this iteration, then saving last.pt (interrupt again to stop at once)\n")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            for s, handler in self.previous.items():
                if s == signal.SIGCHLD and self.signum is not None:  # stopping: workers may still be ending
                    continue
                signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _interrupted_line(run: "Run", it: int) -> str:
    """What an interrupted run kept and how to continue it."""
    if not run.saved_iter:
        return f"interrupted at iteration {it}; no checkpoint yet; start again with the same command"
    kept = "last.pt saved" if run.saved_iter == it else f"last.pt of iteration {run.saved_iter} kept"
    return f"interrupted at iteration {it}; {kept}; continue with: semiseg train --out {run.out} --resume"


@dataclass
class Run:
    """Everything the loop needs, built by `_setup`."""
    cfg: dict
    out: Path
    env: DistEnv
    method: object
    model: nn.Module          # the bare model (checkpoints, evaluation)
    net: nn.Module            # what train_step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: object             # the method's make_state() result, or None
    val: object
    loaders: list
    start: int
    best: float
    total: int
    iters_per_epoch: int
    eval_every: int
    best_iter: int = 0        # the iteration of best.pt (0: unknown, a checkpoint older than this field)
    saved_iter: int = 0       # the iteration of the last checkpoint written


def _setup(cfg: dict, out: Path, resume: bool, env: DistEnv) -> Run | None:
    """Run folder, model, streams, optimizer and method state; restored from out/last.pt with `resume`
    (None: that run is finished)."""
    if env.is_main:
        prepare_run_dir(out, resume)
        remove_leftover_temps(out)
    barrier()
    ckpt = load_checkpoint(out / "last.pt") if resume else None
    tr = cfg["train"]
    method = load_method(cfg["method"])
    per_gpu = per_process_batch(tr["global_batch"], env.world)
    _seed(tr["seed"] + env.rank)
    model = init_model(cfg).to(env.device)  # before the datasets: a wrong weights file fails fast
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"model.name={cfg['model']['name']} has no trainable parameters (a training-free model); "
                        "nothing to train")
    if ckpt:
        check_fits(model, ckpt["model"], out / "last.pt", "the model of this config (resume with the run's own "
                   "model settings, or train into a new --out)")

    val = build_dataset(cfg, "val")
    streams = {name: build_stream(cfg, name) for name in method.LOADERS}
    epoch_len, iters_per_epoch, total, eval_every = schedule(cfg, streams, method.LOADERS, env.world)
    if ckpt and _finished(ckpt, total, iters_per_epoch, out, env):
        return None

    cuda = env.device.type == "cuda"
    if tr["channels_last"]:  # also on the CPU: oneDNN's NHWC convolutions made the synthetic steps ~16 % faster
        model = model.to(memory_format=torch.channels_last)
    if cuda and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN only on CUDA with several processes
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and tr["amp"] == "fp16")
    start, best, best_iter = 0, -1.0, 0
    state = method.make_state(cfg, model, out, env) if hasattr(method, "make_state") else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best = ckpt["iteration"], ckpt["best_miou"]
        best_iter = ckpt.get("best_iter", 0)
        if hasattr(state, "load_state_dict") and ckpt.get("method_state") is not None:
            state.load_state_dict(ckpt["method_state"])
        _set_rng_state(ckpt["rng"][env.rank] if env.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    net = model
    if env.world > 1:
        if hasattr(method, "DDP_IGNORE"):  # parameters the method's own loss uses outside the forward (SimSeg's tau)
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(method.DDP_IGNORE))
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if cuda else None,
                                                  broadcast_buffers=False)
    loaders = [torch.utils.data.DataLoader(
        ds, batch_size=per_gpu, num_workers=tr["workers"], pin_memory=cuda, generator=torch.Generator(),
        sampler=stream_sampler(ds, name, cfg, env, per_gpu, iters_per_epoch, start, total, epoch_len))
        for name, ds in streams.items()]

    if env.is_main:
        run_info = {"version": __version__, "git_sha": git_sha(), "world_size": env.world, "per_gpu_batch": per_gpu,
                    "global_batch": tr["global_batch"], "total_iters": total, "iters_per_epoch": iters_per_epoch,
                    "device": str(env.device)}
        with writing(out / "config.yaml"):
            write_text_atomic(out / "config.yaml", dump({**cfg, "_run": run_info}))
        err.print(f"training {cfg['method']} on {cfg['dataset']['name']}/{cfg['dataset']['split']}: {total} iterations "
                  f"({iters_per_epoch}/epoch), {env.world} process(es) x batch {per_gpu}, device {env.device}"
                  + (f", resuming at {start}" if start else ""))
        err.print(f"data: {cfg['dataset']['root']}; weights: {cfg['model']['weights'] or 'none (random init)'}; "
                  f"run folder: {out}", markup=False, soft_wrap=True)
    return Run(cfg, out, env, method, model, net, optimizer, scaler, state, val, loaders, start, best, total,
               iters_per_epoch, eval_every, best_iter)


def init_model(cfg: dict) -> nn.Module:
    """The model a run starts from: built with model.weights, or (model.init_checkpoint) with every weight of
    a semiseg checkpoint, whose model must fit this config's; its optimizer and schedule are not taken."""
    path = cfg["model"]["init_checkpoint"]
    if not path:
        return build_model(cfg)
    model = build_model(cfg, load_weights=False)
    state = load_checkpoint(path)["model"]
    check_fits(model, state, path, "the model of this config (model.init_checkpoint must come from a run of the "
               "same model settings)")
    model.load_state_dict(state)
    return model


def schedule(cfg: dict, streams: dict, names, world: int) -> tuple[int, int, int, int]:
    """(epoch length in images, iterations per epoch, total iterations, evaluation period in iterations)."""
    tr = cfg["train"]
    per_gpu = per_process_batch(tr["global_batch"], world)
    epoch_len = len(streams[epoch_stream(names)])
    iters_per_epoch = math.ceil(epoch_len / world) // per_gpu
    if iters_per_epoch == 0:
        raise UserError(f"the split has {epoch_len} training images, fewer than one batch of {per_gpu} per process")
    total = tr["iters"] or tr["epochs"] * iters_per_epoch
    eval_every = tr["eval_every"] if tr["iters"] else tr["eval_every"] * iters_per_epoch
    return epoch_len, iters_per_epoch, total, eval_every


def dry_run(cfg: dict, out: Path, world: int = 1) -> dict:
    """`train --dry-run`: check what a run of `cfg` would read (the weights, every split list, the first,
    middle and last image and mask of each list) and return its plan, writing nothing. Every
    problem found is reported, in one UserError."""
    method = load_method(cfg["method"])
    problems, datasets = [], {}
    try:
        init_model(cfg)
    except UserError as e:
        problems.append(str(e))
    for name, build in [("val", lambda: build_dataset(cfg, "val"))] + \
            [(n, (lambda n=n: build_stream(cfg, n))) for n in method.LOADERS]:
        try:
            ds = datasets[name] = build()
            for i in sorted({0, len(ds) // 2, len(ds) - 1}):
                ds.load(i)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError(f"the run would fail: {'; '.join(dict.fromkeys(problems))}")
    epoch_len, iters_per_epoch, total, eval_every = schedule(cfg, datasets, method.LOADERS, world)
    evals = sorted(set(range(eval_every, total + 1, eval_every)) | {total})
    return {"method": cfg["method"], "dataset": f"{cfg['dataset']['name']}/{cfg['dataset']['split']}",
            "images": {name: len(ds) for name, ds in datasets.items()}, "processes": world,
            "per_process_batch": per_process_batch(cfg["train"]["global_batch"], world),
            "global_batch": cfg["train"]["global_batch"], "epoch_images": epoch_len,
            "iters_per_epoch": iters_per_epoch, "total_iters": total, "epochs": round(total / iters_per_epoch, 2),
            "eval_at": evals, "checkpoints": {"last.pt": f"{out / 'last.pt'} (at every evaluation)",
                                              "best.pt": f"{out / 'best.pt'} (when val mIoU improves)"},
            "out": str(out)}


def _finished(ckpt: dict, total: int, iters_per_epoch: int, out: Path, env: DistEnv) -> bool:
    """Whether a resumed run has nothing left to do; a changed schedule is refused: the LR of every
    iteration depends on the total, so a longer train.iters would not continue the run's schedule."""
    old = ckpt["config"]["train"]
    planned = ckpt.get("total_iters") or old["iters"] or old["epochs"] * iters_per_epoch  # older files: from the config
    if total != planned:
        raise UserError(f"{out / 'last.pt'}: the run was planned for {planned} iterations, the config now gives {total} "
                        "(train.iters / train.epochs / train.global_batch or the process count changed); the LR "
                        "schedule depends on the total, so resume without changing them, or train the longer "
                        "schedule into a new --out")
    if ckpt["iteration"] < total:
        return False
    if env.is_main:
        err.print(f"{out} is finished ({ckpt['iteration']} of {total} iterations); nothing to do. "
                  f"Evaluate it with: semiseg eval --run {out}", markup=False)
    return True


def _loop(run: Run) -> dict:
    """Iterations start..total (`_step`); an interrupt stops at an iteration boundary with last.pt saved."""
    cfg, env, tr = run.cfg, run.env, run.cfg["train"]
    log = RunLog(run.out, env.is_main)
    nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)  # any non-finite loss so far
    step = partial(_step, run, log, autocast_for(cfg, env), key_kinds(run.method.LOADERS),
                   tr["channels_last"], nonfinite)
    result: dict = {}
    run.saved_iter = it = run.start

    batches = iter(zip(*run.loaders))
    if err.is_terminal:  # a live bar on a terminal; the log lines below are printed above it
        batches = progress(batches, total=run.total - run.start, desc="train")
    stop = _StopAtBoundary(env.world == 1)
    try:
        with stop:
            while stop.signum is None:
                try:
                    parts = next(batches)
                except StopIteration:
                    break
                except RuntimeError:  # DataLoader workers ended by a signal to the whole process group
                    if stop.signum is None:
                        raise
                    break  # before the step: the weights are still those of iteration `it`
                result = step(parts, it) or result
                it += 1
            if stop.signum is not None and it < run.total:
                if it > run.saved_iter:  # the weights are those of iteration `it`: save them
                    _check_finite(run, nonfinite, it, weights=True)
                    _save_checkpoint(run, it, improved=False, rng=_gather_rng(env))
                raise Interrupted(stop.signum, _interrupted_line(run, it))
    except Interrupted as e:  # a second signal, or any signal under torchrun: stopped mid-iteration
        e.line = e.line or _interrupted_line(run, it)
        raise
    except RuntimeError:  # workers ended (as above) during an evaluation: mid-iteration, nothing saved
        if stop.signum is None:
            raise
        raise Interrupted(stop.signum, _interrupted_line(run, it)) from None
    finally:
        log.close()
        if hasattr(batches, "close"):  # ends the live bar before the CLI prints its last line
            batches.close()
    return result


def _step(run: Run, log: RunLog, amp, kinds: dict, channels_last: bool, nonfinite: torch.Tensor,
          parts, it: int) -> dict | None:
    """Iteration it + 1: LR, forward under autocast, backward, step, log, then the periodic evaluation and
    checkpoint (returns its metrics; None when there was none)."""
    cfg, env, tr = run.cfg, run.env, run.cfg["train"]
    epoch = it // run.iters_per_epoch
    batch = _to_device(parts, run.method.LOADERS, kinds, env.device, channels_last)
    lr = lr_at(cfg, it, run.total, run.iters_per_epoch)
    set_lr(run.optimizer, lr)
    run.optimizer.zero_grad(set_to_none=True)
    with amp:
        loss, logs = run.method.train_step(run.net, batch, StepContext(cfg, it, run.total, env, run.state, epoch,
                                                                       run.scaler.scale))
    if not getattr(run.method, "OWN_BACKWARD", False):
        run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    nonfinite.logical_or_(~torch.isfinite(loss.detach()))  # accumulated on the device: no sync per step
    log.add({"loss": loss.detach(), **logs})
    it += 1

    if it % tr["log_every"] == 0 or it == run.total:
        _check_finite(run, nonfinite, it)
        rec = {"iter": it, "epoch": epoch, "lr": lr, **log.means()}
        log.write(rec)
        if env.is_main:
            err.print(" ".join(f"{k} {v}" for k, v in rec.items()), markup=False)
    result = None
    if it % run.eval_every == 0 or it == run.total:
        _check_finite(run, nonfinite, it, weights=True)
        result = _evaluate_and_save(run, log, it, epoch)
    if it % run.iters_per_epoch == 0 and it // run.iters_per_epoch - 1 in tr["keep_epochs"]:
        _check_finite(run, nonfinite, it, weights=True)  # the end of a kept epoch (SLRNet's checkpoint20 etc.)
        _save_checkpoint(run, it, improved=False, rng=_gather_rng(env), names=(f"epoch{it // run.iters_per_epoch - 1}.pt",))
    return result


def _to_device(parts, names, kinds: dict, device: torch.device, channels_last: bool) -> dict:
    """The loaders' tensors as one batch dict named by the streams' keys; images ImageNet-normalised on
    the device (they leave the workers as uint8)."""
    batch = {}
    for name, tensors in zip(names, parts):
        for key, t in zip(STREAMS[name].keys, tensors):
            t = t.to(device, non_blocking=True)
            if kinds[key] == "image":
                t = normalize(t)
                t = t.contiguous(memory_format=torch.channels_last) if channels_last else t
            batch[key] = t
    return batch


def _check_finite(run: Run, nonfinite: torch.Tensor, it: int, weights: bool = False) -> None:
    """Stop on a non-finite loss; before a checkpoint the weights are checked too, since a finite loss can
    still produce an update that overflows."""
    if weights:
        tensors = [t for t in run.model.state_dict().values() if t.is_floating_point()]  # BN statistics too
        nonfinite.logical_or_(~torch.stack([t.isfinite().all() for t in tensors]).all())
    if bool(nonfinite):
        good = f"{run.out / 'last.pt'} (iteration {run.saved_iter})" if run.saved_iter else "none yet"
        raise UserError(f"the loss became non-finite before iteration {it}; stopped. Last good checkpoint: {good}. "
                        "Try a lower optim.lr or train.amp=bf16")


def _evaluate_and_save(run: Run, log: RunLog, it: int, epoch: int) -> dict:
    """Evaluate, let the method react (PrevMatch's pool), write last.pt (and best.pt when improved)."""
    env = run.env
    result = evaluate(run.model, run.cfg, run.val, env, workers=min(run.cfg["train"]["workers"], 2),
                      progress=partial(_eval_progress, it) if env.is_main else None)
    rng = _gather_rng(env)
    improved = result["miou"] > run.best  # the metrics are all-reduced: every process agrees
    run.best = max(run.best, result["miou"])
    run.best_iter = it if improved else run.best_iter
    if hasattr(run.state, "after_eval"):
        run.state.after_eval(run.model, improved, it)
    if env.is_main:
        log.write({"iter": it, "epoch": epoch, "miou": result["miou"], "best_miou": run.best,
                   "miou_paper": result["miou_paper"], "pixel_acc": result["pixel_acc"]})
        err.print(f"eval @ {it}: mIoU {result['miou']:.2f} (best {run.best:.2f})")
        _save_checkpoint(run, it, improved, rng)
        with writing(run.out / "eval.json"):
            write_text_atomic(run.out / "eval.json", json.dumps({**result, "iter": it, "best_miou": run.best}, indent=2))
        with writing(run.out / "results.csv"):
            write_results_csv(run.out)
    run.saved_iter = it
    barrier()
    return result


def _eval_progress(it: int, items, total: int, desc: str):
    """The progress of a periodic evaluation: about four plain lines (or the bar's own line) per evaluation."""
    return progress(items, total=total, desc=f"{desc} @ {it}", every=max(1, -(-total // 4)))


def _save_checkpoint(run: Run, it: int, improved: bool, rng: list, names: tuple | None = None) -> None:
    """last.pt (and best.pt when `improved`; or the files `names`) of iteration `it`, written atomically by
    rank 0: a full disk leaves the previous file and says so in one line."""
    if not run.env.is_main:
        return
    # contiguous: a channels_last run's NHWC weights saved in the usual layout (readable by any tool, .view-able)
    weights = {k: v.contiguous() for k, v in run.model.state_dict().items()}
    checkpoint = {"model": weights, "checksum": state_checksum(weights), "optimizer": run.optimizer.state_dict(),
                  "scaler": run.scaler.state_dict(), "iteration": it, "best_miou": run.best, "best_iter": run.best_iter,
                  "total_iters": run.total, "rng": rng,
                  "method_state": run.state.state_dict() if hasattr(run.state, "state_dict") else None,
                  "config": run.cfg, "version": __version__}
    for name in names or (("last.pt", "best.pt") if improved else ("last.pt",)):
        with writing(run.out / name):
            save_atomic(checkpoint, run.out / name)
    if names is None:
        run.saved_iter = it


def _gather_rng(env: DistEnv) -> list:
    """RNG states of every process (dropout streams differ per rank), gathered on rank 0."""
    import torch.distributed as dist

    state = _rng_state()
    if env.world == 1:
        return [state]
    states = [None] * env.world
    dist.all_gather_object(states, state)
    return states
