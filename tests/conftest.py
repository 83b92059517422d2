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
