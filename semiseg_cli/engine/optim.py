"""Optimisers, parameter groups and LR schedules, each looked up by name in one table.

Parameter groups: one per top-level child module of the model (the model contract names them, e.g.
`backbone`, `head`; a parameter held by the model itself, SimSeg's temperature, is one of its own name), with LR = optim.lr x optim.lr_mult[child] (default 1). When optim.bias_lr_factor is not
1 or optim.bias_weight_decay is set, each child's biases get a group of their own with LR x that factor and
that weight decay (SLRNet: backbone x1 / biases x2, new layers x10 / biases x20, bias weight decay 0).
Frozen parameters are left out.

Schedules map (iteration t, total T, iterations per epoch) to a factor of each group's LR, set before the
step of iteration t:
    poly                  (1 - t/T)^poly_power (UniMatch; t = 0 uses the base LR)
    cosine                linear warmup t/W over W = int(optim.warmup x T) steps, then
                          floor + (1 - floor) 1/2 (1 + cos(pi p)), p = (t - W)/(T - W) (SimSeg: warmup 0.025,
                          floor 0.1: the LR ends at a tenth)
    constant_then_cosine  constant for the first optim.constant_epochs epochs, then a per-iteration cosine to
                          0 at T (SLRNet keeps it constant through epoch pretrain_epochs inclusive, its test
                          being `epoch > pretrain_epochs`: its recipes set constant_epochs = pretrain + 1)
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _poly(o: dict, t: int, total: int, iters_per_epoch: int) -> float:
    return (1 - t / total) ** o["poly_power"]


def _cosine(o: dict, t: int, total: int, iters_per_epoch: int) -> float:
    warm = int(o["warmup"] * total)
    if t < warm:
        return t / warm
    p = (t - warm) / max(total - warm, 1)
    return o["cosine_floor"] + (1 - o["cosine_floor"]) * 0.5 * (1 + math.cos(math.pi * p))


def _constant_then_cosine(o: dict, t: int, total: int, iters_per_epoch: int) -> float:
    # SLRNet's CosineAnnealingLR has T_max = (epochs - pretrain) x iters but starts one epoch late, so it
    # ends at ~0.3 % of the LR instead of 0; here the cosine spans exactly the iterations left.
    constant = o["constant_epochs"] * iters_per_epoch
    if t < constant:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (t - constant) / max(total - constant, 1)))


SCHEDULES = {"poly": _poly, "cosine": _cosine, "constant_then_cosine": _constant_then_cosine}


def lr_at(cfg: dict, t: int, total: int, iters_per_epoch: int) -> float:
    """The base LR (optim.lr x the schedule's factor) of iteration t; group LRs are this x their lr_mult."""
    o = cfg["optim"]
    return o["lr"] * SCHEDULES[o["schedule"]](o, t, total, iters_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"]


def param_groups(cfg: dict, model: nn.Module) -> list[dict]:
    """The parameter groups described in the module docstring."""
    o = cfg["optim"]
    split_bias = o["bias_lr_factor"] != 1.0 or o["bias_weight_decay"] is not None
    groups = []
    # a parameter of the model itself (SimSeg's temperature) counts as a child of its own name
    children = list(model.named_children()) + [(n, p) for n, p in model.named_parameters(recurse=False)]
    for name, child in children:
        mult = o["lr_mult"].get(name, 1.0)
        pairs = child.named_parameters() if isinstance(child, nn.Module) else [("", child)]
        params = [(n, p) for n, p in pairs if p.requires_grad]
        biases = [p for n, p in params if split_bias and n.endswith("bias")]
        weights = [p for n, p in params if not (split_bias and n.endswith("bias"))]
        if weights:
            groups.append({"params": weights, "name": name, "lr": o["lr"] * mult, "lr_mult": mult,
                           "weight_decay": o["weight_decay"]})
        if biases:
            bias_mult = mult * o["bias_lr_factor"]
            wd = o["weight_decay"] if o["bias_weight_decay"] is None else o["bias_weight_decay"]
            groups.append({"params": biases, "name": f"{name}.bias", "lr": o["lr"] * bias_mult, "lr_mult": bias_mult,
                           "weight_decay": wd})
    return groups


def _sgd(o: dict, groups: list) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                           nesterov=o["nesterov"])


def _adamw(o: dict, groups: list) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """`optim.name` over the parameter groups of `model` (see the module docstring)."""
    o = cfg["optim"]
    return OPTIMIZERS[o["name"]](o, param_groups(cfg, model))
