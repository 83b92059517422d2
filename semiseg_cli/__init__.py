"""semiseg: label-efficient semantic segmentation behind one CLI."""
import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting stall badly when any other process (a DataLoader worker doing
# augmentation, a second run) wants the same cores (several times slower steps on 2 cores).
# Passive waiting costs little when the cores are free. Set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_API = ("load", "evaluate", "train", "Predictor")


def __getattr__(name):
    """The Python API (semiseg_cli/api.py), imported on first use so that `semiseg --help` needs no torch."""
    if name in _API:
        from semiseg_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'semiseg_cli' has no attribute {name!r}")
