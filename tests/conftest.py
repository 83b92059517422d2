"""Shared test helpers: where the real sample data is, and how to run the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEMISEG_SHARED", REPO.parent / "shared")) / "data"


def run_cli(*args, cwd=None, env=None, check=None) -> subprocess.CompletedProcess:
    """Run `python -m semiseg_cli ARGS` in a subprocess (the real entry point, exit codes included)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "semiseg_cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared sample data is missing at {SHARED}; set SEMISEG_SHARED to the shared/ folder")
    return SHARED


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The real generated synthetic dataset (made once per test session)."""
    from semiseg_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_root(synthetic_root, tmp_path_factory) -> Path:
    """A view of the synthetic data with small splits: 8 labeled, 16 unlabeled, 6 val images."""
    from semiseg_cli.data.splits import read_split, write_split

    root = tmp_path_factory.mktemp("tiny")
    for sub in ("images", "masks"):
        (root / sub).symlink_to(synthetic_root / sub)
    (root / "classes.txt").write_text((synthetic_root / "classes.txt").read_text())
    train = read_split(synthetic_root / "splits" / "default" / "unlabeled.txt")
    val = read_split(synthetic_root / "splits" / "val.txt")
    write_split(root / "splits" / "tiny" / "labeled.txt", train[:8])
    write_split(root / "splits" / "tiny" / "unlabeled.txt", train[8:24])
    write_split(root / "splits" / "val.txt", val[:6])
    return root


# A training config that runs in seconds on a CPU: tiny encoder and head, small crops.
TINY = ["dataset.split=tiny", "model.backbone=resnet18", "model.weights=null", "model.head_channels=16", "train.crop_size=64",
        "train.global_batch=4", "train.workers=0", "train.log_every=1"]


@pytest.fixture
def semiseg(monkeypatch, capsys):
    """semiseg(*args) -> (exit code, stdout, stderr lines) of `semiseg ARGS` run in-process by main(), the
    console script's entry point (exit codes and stderr as a shell sees them); a traceback fails the test."""
    from semiseg_cli.cli import main

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["semiseg", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out, err.strip().splitlines()
    return call
