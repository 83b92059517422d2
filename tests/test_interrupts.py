"""Ctrl-C (SIGINT) and SIGTERM end a command with one line on stderr and exit 130 / 143, no traceback; what
the command kept continues to the result of an uninterrupted run (prepare-data: the same files; train:
last.pt saved at an iteration boundary, then --resume gives the same weights)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from semiseg_cli.errors import Interrupted
from semiseg_cli.io import leftover_temps
from tests.conftest import TINY, run_cli


def tiny_args(root, *extra):
    return [a for s in [f"dataset.root={root}", *TINY, *extra] for a in ("--set", s)]


def start(args, stderr: Path) -> subprocess.Popen:
    """`python -m semiseg_cli ARGS` in the background, stderr into a file (read while it runs)."""
    with open(stderr, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "semiseg_cli", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=f)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


def interrupt(proc: subprocess.Popen, signum: int, stderr: Path) -> list[str]:
    """Send `signum`; return the stderr lines that came after it, the progress lines of training left out."""
    before = len(stderr.read_text().splitlines())
    proc.send_signal(signum)
    proc.wait(timeout=300)
    text = stderr.read_text()
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines()[before:] if not ln.startswith("iter ")]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def logged_iters(run: Path) -> int:
    log = run / "log.jsonl"
    return sum('"loss"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


def test_prepare_data_interrupted_then_rerun_gives_the_files_of_an_uninterrupted_run(synthetic_root, tmp_path):
    # synthetic_root is `generate(root, seed=0)`, what `prepare-data synthetic` runs (data/prepare.py)
    root, stderr = tmp_path / "syn", tmp_path / "stderr.txt"
    proc = start(["prepare-data", "synthetic", "--root", root], stderr)
    wait_for(lambda: (root / "images").is_dir() and len(list((root / "images").iterdir())) >= 20, proc,
             "20 images were written")
    lines = interrupt(proc, signal.SIGINT, stderr)
    assert proc.returncode == 130
    lines = [ln for ln in lines if not ln.startswith("synthetic ")]  # its progress lines
    assert 1 <= len(lines) <= 3 and "interrupted (SIGINT)" in lines[-1] and "run the same command again" in lines[-1]
    assert len(list((root / "images").iterdir())) < 1416, "it finished before the interrupt"
    assert leftover_temps(root) == []
    run_cli("prepare-data", "synthetic", "--root", root, check=0)
    assert digests(root) == digests(synthetic_root)


def test_train_interrupted_saves_last_pt_and_resumes_to_the_uninterrupted_weights(tiny_root, tmp_path):
    # evaluations at 20 and 40: the interrupt lands before the first, the resumed run makes both
    args = tiny_args(tiny_root, "train.iters=40", "train.eval_every=20")
    full = tmp_path / "full"
    run_cli("train", "--recipe", "supervised-synthetic", *args, "--out", full, check=0)

    part, stderr = tmp_path / "part", tmp_path / "stderr.txt"
    proc = start(["train", "--recipe", "supervised-synthetic", *args, "--out", part], stderr)
    wait_for(lambda: logged_iters(part) >= 3, proc, "3 iterations were logged")
    lines = interrupt(proc, signal.SIGINT, stderr)
    assert proc.returncode == 130
    it = torch.load(part / "last.pt", weights_only=True)["iteration"]
    assert 3 <= it < 40, "it finished before the interrupt"
    assert len(lines) <= 3, lines
    assert lines[-1] == f"interrupted at iteration {it}; last.pt saved; continue with: semiseg train --out {part} --resume"
    assert not (part / ".lock").exists() and leftover_temps(part) == []

    run_cli("train", "--out", part, "--resume", check=0)
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "eval.json").read_text())["iter"] == 40


def test_train_sigterm_exits_143_with_last_pt_of_the_iteration_it_names(tiny_root, tmp_path):
    run, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start(["train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root, "train.iters=1000",
                                                                          "train.eval_every=1000"), "--out", run], stderr)
    wait_for(lambda: logged_iters(run) >= 2, proc, "2 iterations were logged")
    lines = interrupt(proc, signal.SIGTERM, stderr)
    assert proc.returncode == 143
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert len(lines) <= 3 and lines[-1].startswith(f"interrupted at iteration {ckpt['iteration']}; last.pt saved;")
    assert ckpt["best_miou"] == -1.0 and not (run / "eval.json").exists()  # saved between evaluations
    assert not (run / ".lock").exists() and leftover_temps(run) == []


def test_a_signal_waits_for_the_iteration_boundary_and_a_second_one_stops_at_once():
    from semiseg_cli.engine.trainer import _StopAtBoundary

    before = signal.getsignal(signal.SIGINT)
    with _StopAtBoundary(True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # recorded, nothing raised: the step goes on
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between two bytecodes
        assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    with _StopAtBoundary(False) as stop:  # under torchrun: not deferred
        assert signal.getsignal(signal.SIGINT) is before
