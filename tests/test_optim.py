"""engine/optim.py: optimisers, parameter-group rules and LR schedules, each a table entry."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from semiseg_cli.config import CHOICES, load_config
from semiseg_cli.engine.optim import OPTIMIZERS, SCHEDULES, build_optimizer, lr_at, set_lr


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_config_choices_are_the_tables():
    assert CHOICES["optim.schedule"] == list(SCHEDULES) and CHOICES["optim.name"] == list(OPTIMIZERS)


def test_poly_is_unimatchs_rule():
    cfg = load_config(None, ["optim.lr=0.01"])
    assert lr_at(cfg, 0, 100, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 50, 100, 10) == pytest.approx(0.01 * 0.5 ** 0.9)


def test_cosine_has_simsegs_warmup_and_floor():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.lr=1e-4", "optim.warmup=0.025", "optim.cosine_floor=0.1"])
    total = 1000  # W = int(0.025 x 1000) = 25 warmup steps, linear from 0
    assert lr_at(cfg, 0, total, 50) == 0.0
    assert lr_at(cfg, 10, total, 50) == pytest.approx(1e-4 * 10 / 25)
    assert lr_at(cfg, 25, total, 50) == pytest.approx(1e-4)
    p = (500 - 25) / (total - 25)
    assert lr_at(cfg, 500, total, 50) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    assert lr_at(cfg, total, total, 50) == pytest.approx(1e-5)  # ends at a tenth


def test_constant_then_cosine_keeps_the_lr_for_the_constant_epochs():
    cfg = load_config(None, ["optim.schedule=constant_then_cosine", "optim.lr=0.1", "optim.constant_epochs=6"])
    ipe, total = 10, 200
    assert {lr_at(cfg, t, total, ipe) for t in range(60)} == {0.1}
    assert lr_at(cfg, 60, total, ipe) == pytest.approx(0.1)
    assert lr_at(cfg, 130, total, ipe) == pytest.approx(0.05)  # half-way through the 140 cosine iterations
    assert lr_at(cfg, 199, total, ipe) < 1e-4


def test_groups_per_child_with_multipliers_and_frozen_parameters_left_out():
    cfg = load_config(None, ["optim.lr=0.01"])
    opt = build_optimizer(cfg, TwoPart())
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "head"} and isinstance(opt, torch.optim.SGD)
    assert groups["head"]["lr"] == pytest.approx(0.1) and not opt.defaults["nesterov"]
    set_lr(opt, 0.002)
    assert groups["backbone"]["lr"] == pytest.approx(0.002) and groups["head"]["lr"] == pytest.approx(0.02)


def test_slrnet_bias_groups_double_the_lr_without_weight_decay_and_nesterov():
    cfg = load_config(None, ["optim.lr=0.001", "optim.weight_decay=5e-4", "optim.bias_lr_factor=2",
                             "optim.bias_weight_decay=0", "optim.nesterov=true"])
    opt = build_optimizer(cfg, TwoPart())
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "backbone.bias", "head", "head.bias"} and opt.defaults["nesterov"]
    want = {"backbone": (0.001, 5e-4), "backbone.bias": (0.002, 0.0), "head": (0.01, 5e-4), "head.bias": (0.02, 0.0)}
    for name, (lr, wd) in want.items():
        assert groups[name]["lr"] == pytest.approx(lr) and groups[name]["weight_decay"] == wd, name
    model = TwoPart()
    opt = build_optimizer(cfg, model)
    bias_ids = {id(p) for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad}
    assert {id(p) for g in opt.param_groups if g["name"].endswith(".bias") for p in g["params"]} == bias_ids


def test_adamw_takes_betas_and_eps():
    cfg = load_config(None, ["optim.name=adamw", "optim.betas=[0.9, 0.98]", "optim.eps=1e-6"])
    opt = build_optimizer(cfg, TwoPart())
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
