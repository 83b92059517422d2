"""`semiseg gen-pseudo`: pseudo-labels for a folder, a file or a list of images, by a pluggable labeler.

A labeler maps a batch of images to per-class scores in [0, 1] at each image's size and names its classes
and palette; `pseudo/writer.py` is the one writer (labels, confidences, scores, a split list; resumable;
sharded over torchrun processes). Labelers are looked up by `--model` in `LABELERS`:

    checkpoint  a trained semiseg checkpoint (`--checkpoint`): the softmax probabilities of the prediction
                `eval` makes with the checkpoint's eval settings (whole / slide, scales, flip)
    maskclip    MaskCLIP (`--weights`, a `convert-weights openai-clip|open-clip` file; `--classes`): the
                softmax of 100 x the cosine of the dense CLIP features with 85-template prompt ensembles,
                max over each class's concepts (a 21-class VOC space through background concepts, e.g.
                `--classes voc12_wbg_classes_w_concepts4`)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from semiseg_cli.errors import UserError, unknown_name


@dataclass
class Labeler:
    """What the writer needs from a labeler.

    score_fn: (ImageNet-normalised batch [B, 3, h, w], out_size (H, W)) -> scores [B, K, H, W] in [0, 1].
    class_names: the K names; palette: [256, 3] uint8 colours of the label PNGs.
    resize: `transforms.eval_resize` arguments for the network input (`eval_resize_of(cfg)`).
    cfg: the resolved config (its `crf` section refines scores with --crf).
    """
    score_fn: Callable
    class_names: list
    palette: np.ndarray
    resize: dict
    cfg: dict


def checkpoint_labeler(opts: dict, device) -> Labeler:
    from semiseg_cli.data.facts import class_names, palette
    from semiseg_cli.data.transforms import eval_resize_of
    from semiseg_cli.engine.checkpoint import model_from_checkpoint
    from semiseg_cli.engine.infer import model_scores

    if not opts.get("checkpoint"):
        raise UserError("gen-pseudo --model checkpoint needs --checkpoint FILE (best.pt / last.pt of a run)")
    cfg, model = model_from_checkpoint(opts["checkpoint"], None, opts.get("sets") or [])
    ds = cfg["dataset"]
    return Labeler(model_scores(model.to(device), cfg), class_names(ds["name"], ds["root"]), palette(ds["name"]),
                   eval_resize_of(cfg), cfg)


def maskclip_labeler(opts: dict, device) -> Labeler:
    from semiseg_cli.config import load_config
    from semiseg_cli.data.facts import voc_palette
    from semiseg_cli.data.transforms import eval_resize_of
    from semiseg_cli.engine.infer import model_scores
    from semiseg_cli.models.maskclip import maskclip_from_weights
    from semiseg_cli.models.semivl import read_class_list

    if not opts.get("weights") or not opts.get("classes"):
        raise UserError("gen-pseudo --model maskclip needs --weights FILE (from `semiseg convert-weights openai-clip`) "
                        "and --classes NAME|FILE")
    classes = read_class_list(opts["classes"])
    # MaskCLIP's evaluation resize (mmseg's img_scale (2048, 512)) and whole-image prediction; --set changes them
    cfg = load_config(None, ["model.name=maskclip", f"model.weights={opts['weights']}", "eval.img_scale=[2048, 512]",
                             "eval.align_corners=false",
                             *(opts.get("sets") or [])])
    cfg["dataset"]["num_classes"] = len(classes)  # the labeler's own class space, not a dataset's
    model = maskclip_from_weights(cfg["model"], classes).to(device)
    names = [c if isinstance(c, str) else (c[0] if isinstance(c[0], str) else c[0][0]) for c in classes]
    return Labeler(model_scores(model, cfg), names, voc_palette(256), eval_resize_of(cfg), cfg)


# --model -> the labeler builder (options dict, device) -> Labeler
LABELERS: dict[str, Callable] = {"checkpoint": checkpoint_labeler, "maskclip": maskclip_labeler}


def build_labeler(name: str, opts: dict, device) -> Labeler:
    if name not in LABELERS:
        raise unknown_name("labeler (--model)", name, LABELERS)
    return LABELERS[name](opts, device)
