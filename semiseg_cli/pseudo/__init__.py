"""`semiseg gen-pseudo`: pseudo-labels for a folder, a file or a list of images, by a pluggable labeler.

A labeler maps a batch of images to per-class scores in [0, 1] at each image's size and names its classes
and palette; `pseudo/writer.py` is the one writer (labels, confidences, scores, a split list; resumable;
sharded over torchrun processes). Labelers are looked up by `--model` in `LABELERS`:

    checkpoint  a trained semiseg checkpoint (`--checkpoint`): the softmax probabilities of the prediction
                `eval` makes with the checkpoint's eval settings (whole / slide, scales, flip); an SLRNet
                checkpoint with `--image-labels FILE` keeps each image's given classes (its two-stage labels)
    maskclip    MaskCLIP (`--weights`, a `convert-weights openai-clip|open-clip` file; `--classes`): the
                softmax of 100 x the cosine of the dense CLIP features with 85-template prompt ensembles,
                max over each class's concepts (a 21-class VOC space through background concepts, e.g.
                `--classes voc12_wbg_classes_w_concepts4`)
    sed         SED (`--weights`, a `convert-weights sed` file; `--classes sed_voc21|sed_context60|FILE`): the
                sigmoid of each concept's SED logit, max over each class's concepts; `--precision`,
                `--input-size` (SED's 768)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from semiseg_cli.errors import UserError, unknown_name


@dataclass
class Labeler:
    """What the writer needs from a labeler.

    score_fn: (stacked `prepare` outputs [B, ...] on the device, image sizes [(H, W)] * B, their files) -> per-image
        scores [K, H, W] in [0, 1] at each image's size (`engine.infer.predict_images`).
    class_names: the K names; palette: [256, 3] uint8 colours of the label PNGs.
    prepare: PIL RGB image -> network input tensor, run in the DataLoader workers (picklable).
    cfg: the resolved config (its `crf` section refines scores with --crf; train.workers).
    """
    score_fn: Callable
    class_names: list
    palette: np.ndarray
    prepare: Callable
    cfg: dict


def checkpoint_labeler(opts: dict, device) -> Labeler:
    from semiseg_cli.data.facts import class_names, palette
    from semiseg_cli.engine.checkpoint import model_from_checkpoint
    from semiseg_cli.engine.infer import eval_input_of, model_scores

    if not opts.get("checkpoint"):
        raise UserError("gen-pseudo --model checkpoint needs --checkpoint FILE (best.pt / last.pt of a run)")
    cfg, model = model_from_checkpoint(opts["checkpoint"], None, opts.get("sets") or [])
    ds = cfg["dataset"]
    labels = None
    if opts.get("image_labels"):
        from semiseg_cli.data.image_labels import read_image_labels

        labels = read_image_labels(opts["image_labels"], ds["num_classes"])
    return Labeler(model_scores(model.to(device), cfg, labels), class_names(ds["name"], ds["root"]),
                   palette(ds["name"]), eval_input_of(cfg), cfg)


def maskclip_labeler(opts: dict, device) -> Labeler:
    from semiseg_cli.config import load_config
    from semiseg_cli.data.facts import voc_palette
    from semiseg_cli.engine.infer import eval_input_of, model_scores
    from semiseg_cli.models.maskclip import maskclip_from_weights
    from semiseg_cli.models.semivl import read_class_set

    if not opts.get("weights") or not opts.get("classes"):
        raise UserError("gen-pseudo --model maskclip needs --weights FILE (from `semiseg convert-weights openai-clip`) "
                        "and --classes NAME|FILE")
    names, classes = read_class_set(opts["classes"])
    # MaskCLIP's evaluation resize (mmseg's img_scale (2048, 512)) and whole-image prediction; --set changes them
    cfg = load_config(None, ["model.name=maskclip", f"model.weights={opts['weights']}", "eval.img_scale=[2048, 512]",
                             "eval.align_corners=false",
                             *(opts.get("sets") or [])])
    cfg["dataset"]["num_classes"] = len(classes)  # the labeler's own class space, not a dataset's
    model = maskclip_from_weights(cfg["model"], classes).to(device)
    return Labeler(model_scores(model, cfg), names, voc_palette(256), eval_input_of(cfg), cfg)


# --precision -> (autocast dtype name or None, allow TF32 matmuls and convolutions); names: the CLI imports
# this module without torch
PRECISIONS = {"fp32": (None, False), "tf32": (None, True), "bf16": ("bfloat16", False)}


def sed_labeler(opts: dict, device) -> Labeler:
    """SED as SemiOVS runs it (specs/semiovs_sed.md §1.2): scores = sigmoid of the concept logits, bilinearly
    resized to the image, max over each class's concepts. The text input (80 ImageNet templates per concept,
    the whole concept list: the class attention sees every concept) is computed once and cached beside the
    weights."""
    import torch
    import torch.nn.functional as F

    from semiseg_cli.config import load_config
    from semiseg_cli.data.facts import voc_palette
    from semiseg_cli.models.prompts import templates
    from semiseg_cli.models.sed import INPUT_SIZE, SED, sed_input
    from semiseg_cli.models.semivl import read_class_set
    from semiseg_cli.models.text_embeddings import flatten_classes, max_per_class, template_embeddings

    if not opts.get("weights") or not opts.get("classes"):
        raise UserError("gen-pseudo --model sed needs --weights FILE (from `semiseg convert-weights sed`) "
                        "and --classes sed_voc21|sed_context60|FILE")
    size = opts.get("input_size") or INPUT_SIZE
    if size % 32:
        raise UserError(f"--input-size {size}: must be a multiple of 32 (SED's stride; its own is {INPUT_SIZE})")
    precision = opts.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise unknown_name("precision (--precision)", precision, PRECISIONS)
    names, classes = read_class_set(opts["classes"])
    cfg = load_config(None, list(opts.get("sets") or []))
    model = SED.from_file(opts["weights"]).to(device)
    concepts, owner = flatten_classes(classes)
    text = template_embeddings(opts["weights"], concepts, templates("imagenet80")).to(device)
    owner = torch.tensor(owner, device=device)
    dtype, tf32 = PRECISIONS[precision]
    dtype = getattr(torch, dtype) if dtype else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

    def scores(x: torch.Tensor, sizes: list, files: list | None = None) -> list:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            probs = model(x, text).float().sigmoid()
        # per image: resize every concept map to the image (SED's sem_seg_postprocess), then max per class
        return [max_per_class(F.interpolate(p[None], size=tuple(hw), mode="bilinear", align_corners=False)[0],
                              owner, len(classes), dim=0) for p, hw in zip(probs, sizes)]

    return Labeler(scores, names, voc_palette(256), partial(sed_input, size=size), cfg)


# --model -> the labeler builder (options dict, device) -> Labeler
LABELERS: dict[str, Callable] = {"checkpoint": checkpoint_labeler, "maskclip": maskclip_labeler, "sed": sed_labeler}


def build_labeler(name: str, opts: dict, device) -> Labeler:
    if name not in LABELERS:
        raise unknown_name("labeler (--model)", name, LABELERS)
    return LABELERS[name](opts, device)
