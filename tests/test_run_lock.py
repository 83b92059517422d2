"""One run folder, one writer: OUT/.lock while training; a live holder stops a second `train`, a dead one's
lock is taken over; leftover temp files of killed atomic writes are removed at start."""
import json
import os
import socket
import subprocess
import sys

import pytest

from semiseg_cli.distributed import DistEnv
from semiseg_cli.engine import trainer
from semiseg_cli.engine.trainer import LOCK, RunLock
from semiseg_cli.errors import UserError
from semiseg_cli.io import leftover_temps, temp_path
from tests.conftest import TINY, run_cli


def tiny_args(root, *extra):
    return [a for s in [f"dataset.root={root}", *TINY, *extra] for a in ("--set", s)]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                        "started": "2024-01-01T00:00:00"}))


def test_lock_is_taken_and_released_also_on_errors(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"process {os.getpid()}@"):
            RunLock(tmp_path / "run").__enter__()  # a second taker while it is held
        assert lock.path.exists()
    assert not (tmp_path / "run" / LOCK).exists()
    with pytest.raises(KeyboardInterrupt):
        with RunLock(tmp_path / "run"):
            raise KeyboardInterrupt
    assert not (tmp_path / "run" / LOCK).exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, dead_pid(), host="elsewhere.example")
    with pytest.raises(UserError, match=r"@elsewhere\.example.*delete .*\.lock"):
        RunLock(tmp_path).__enter__()


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, os.getpid())  # held by a live process

    class Reached(Exception):
        pass

    def fake_setup(*args):
        raise Reached

    monkeypatch.setattr(trainer, "_setup", fake_setup)
    monkeypatch.setattr(trainer, "init_distributed", lambda: DistEnv(rank=1, world=2))
    with pytest.raises(Reached):  # rank 1 does not look at the lock
        trainer.train({}, tmp_path)
    monkeypatch.setattr(trainer, "init_distributed", lambda: DistEnv(rank=0, world=2))
    with pytest.raises(UserError, match="in use by another training run"):
        trainer.train({}, tmp_path)


def test_leftover_temps_follow_the_temp_name_rule(tmp_path):
    keep = [tmp_path / "last.pt", tmp_path / ".lock", tmp_path / "notes.tmp", tmp_path / ".x.tmpfile"]
    gone = [temp_path(tmp_path / "last.pt"), tmp_path / ".best.pt.tmp12", tmp_path / "prev_models" / ".a.pt.tmp7"]
    for p in keep + gone:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert leftover_temps(tmp_path) == sorted(gone)


def test_cli_second_train_on_a_live_run_folder_exits_2(tiny_root, tmp_path):
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(out, sleeper.pid)
        proc = run_cli("train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root, "train.iters=2"), "--out", out)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"process {sleeper.pid}@{socket.gethostname()}" in proc.stderr
        assert (out / LOCK).exists() and not (out / "config.yaml").exists()  # the holder's lock stays
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cli_stale_lock_is_taken_over_and_leftover_temps_removed(tiny_root, tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid)
    leftover = out / ".last.pt.tmp999999"  # a killed run's half-written checkpoint
    leftover.write_bytes(b"half a checkpoint")
    proc = run_cli("train", "--recipe", "supervised-synthetic",
                   *tiny_args(tiny_root, "train.iters=2", "train.eval_every=2"), "--out", out, check=0)
    assert f"taking over the lock of process {pid}@" in proc.stderr
    assert f"removed {leftover}" in proc.stderr
    assert not leftover.exists() and (out / "last.pt").is_file()
    assert not (out / LOCK).exists()  # released at the end
