"""Pieces of the trainer: per-key log means, the run sampler's keys, a training-free model refused."""
from __future__ import annotations

import torch

from semiseg_cli.distributed import DistEnv
from semiseg_cli.engine.trainer import RunLog, RunSampler
from tests.conftest import run_cli


def test_each_logged_value_is_averaged_over_the_steps_that_reported_it(tmp_path):
    log = RunLog(tmp_path, enabled=False)
    log.add({"loss": torch.tensor(1.0)})
    log.add({"loss": torch.tensor(3.0), "loss_prev": torch.tensor(0.5)})  # PrevMatch's term once its pool fills
    log.add({"loss": torch.tensor(2.0), "loss_prev": torch.tensor(1.5)})
    means = log.means()
    assert means["loss"] == 2.0 and means["loss_prev"] == 1.0  # not 2.0 / 3 steps
    assert log.means().keys() == {"it_per_s"}  # a new window


def test_run_sampler_keys_resume_mid_epoch_at_the_same_key():
    full = list(RunSampler(10, 3, DistEnv(), 2, 5, 0, 12, items=25, stream_seed=4))
    resumed = list(RunSampler(10, 3, DistEnv(), 2, 5, 7, 12, items=25, stream_seed=4))
    assert resumed == full[7 * 2:] and len(full) == 24
    assert all(0 <= index < 25 for _, _, index in full)


def test_a_training_free_model_is_refused_by_train_in_one_line(tmp_path):
    proc = run_cli("train", "--recipe", "supervised-synthetic", "--set", "model.name=maskclip",
                   "--set", "model.backbone=clip-vit-tiny", "--set", "model.weights=null", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "no trainable parameters" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
