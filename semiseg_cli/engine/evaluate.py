"""Evaluation: prediction modes of specs/semivl_unimatch.md §2 and mIoU from a device-side confusion matrix.

Modes (`eval.mode`):
    whole      the whole image at once (UniMatch: Pascal, COCO).
    slide      mmseg / ZegCLIP style (SemiVL): windows of eval.crop shifted back inside the image,
               logits averaged where windows overlap.
    slide_sum  UniMatch's Cityscapes window: windows at 0, s, 2s, ... truncated at the border,
               softmax probabilities summed.
Multi-scale (`eval.scales`) and flip (`eval.flip`) sum softmax probabilities over the variants.
A model with its own inference (`aggregate(x, eval_cfg, labels)`: SLRNet's scales, flip, image-label rule and
bg_pow) is called instead and returns probabilities as they are (not renormalised); `eval.image_labels: given`
passes it each image's classes (dataset.image_labels, else the ground-truth mask's), `eval.crf` refines them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from semiseg_cli.data.facts import IGNORE_INDEX
from semiseg_cli.data.transforms import normalize
from semiseg_cli.distributed import DistEnv, all_reduce_sum


def _slide_mmseg(model, x, num_classes, crop, stride):
    """Shifted windows, mean of logits (mmseg `slide_inference`)."""
    b, _, h, w = x.shape
    n_h = max(h - crop + stride - 1, 0) // stride + 1
    n_w = max(w - crop + stride - 1, 0) // stride + 1
    logits = x.new_zeros((b, num_classes, h, w))
    count = x.new_zeros((1, 1, h, w))
    for i in range(n_h):
        for j in range(n_w):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def _slide_unimatch(model, x, num_classes, crop, stride):
    """Windows at 0, s, 2s, ... (truncated at the border), summed softmax (UniMatch Cityscapes)."""
    b, _, h, w = x.shape
    probs = x.new_zeros((b, num_classes, h, w))
    for y in range(0, h, stride):
        for x0 in range(0, w, stride):
            win = x[:, :, y:y + crop, x0:x0 + crop]
            probs[:, :, y:y + crop, x0:x0 + crop] += model(win).softmax(1)
    return probs


def own_inference(model) -> bool:
    """Whether the model aggregates its own predictions (`aggregate`; see the module docstring)."""
    return callable(getattr(model, "aggregate", None))


@torch.no_grad()
def predict(model, x: torch.Tensor, cfg: dict, out_size: tuple[int, int] | None = None,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """Class scores [B, K, H, W] for a normalised image batch, at `out_size` (default: x's size).

    Single-scale whole/slide return logits (slide_sum: summed probabilities); with several scales or
    flip the softmax probabilities of all variants are summed. Scores are resized to `out_size`
    bilinearly (align_corners per eval.align_corners: True in SemiVL's zegclip evaluation, False in mmseg's
    MaskCLIP) when it differs from x's size.
    """
    ev, k = cfg["eval"], cfg["dataset"]["num_classes"]
    crop = ev["crop"] or cfg["train"]["crop_size"]
    stride = ev["stride"] or int(crop * 2 / 3)
    h, w = x.shape[-2:]

    def one(img):
        if ev["mode"] == "slide":
            return _slide_mmseg(model, img, k, crop, stride)
        if ev["mode"] == "slide_sum":
            return _slide_unimatch(model, img, k, crop, stride)
        return model(img)

    variants = [(s, f) for s in ev["scales"] for f in ([False, True] if ev["flip"] else [False])]
    if own_inference(model):
        scores = model.aggregate(x, ev, labels)
    elif variants == [(1.0, False)]:
        scores = one(x)
    else:
        scores = 0
        for scale, flip in variants:
            img = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
            img = img.flip(-1) if flip else img
            s = one(img)
            s = s.flip(-1) if flip else s
            s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=True) if scale != 1.0 else s
            scores = scores + s.softmax(1)
    if out_size is not None and tuple(out_size) != (h, w):
        scores = F.interpolate(scores, size=tuple(out_size), mode="bilinear", align_corners=ev["align_corners"])
    return scores


def probabilities(scores: torch.Tensor, cfg: dict, model=None) -> torch.Tensor:
    """`predict`'s scores as per-pixel class probabilities: the softmax of single-variant whole/slide logits,
    else the summed softmax maps (slide_sum windows, scales, flips) divided by their per-pixel sum; a model with
    its own inference already gives them (`own_inference`)."""
    ev = cfg["eval"]
    if own_inference(model):
        return scores.float()
    if ev["mode"] == "slide_sum" or list(ev["scales"]) != [1.0] or ev["flip"]:
        return scores / scores.sum(1, keepdim=True).clamp(min=1e-12)
    return scores.float().softmax(1)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[K, K] counts (rows = target, cols = prediction) of pixels whose target is not ignored."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def metrics(conf: torch.Tensor, class_names: list[str]) -> dict:
    """mIoU and friends from a confusion matrix (see DESIGN.md, engine rules, for the keys).

    `miou` is the mean over classes that occur in the target or the prediction (mmseg / torchmetrics);
    `miou_paper` is UniMatch's convention, a mean over all K classes with absent ones counting 0.
    `per_class_acc` is each class's recall (its ground-truth pixels predicted as it; None where the
    class has no ground-truth pixel) and `macc` their mean (mmseg's mAcc). `confusion` is the matrix
    itself (rows = ground truth, columns = prediction), so that a picture can be drawn from eval.json.
    """
    counts = conf.long().cpu()
    conf = counts.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / union  # nan where a class is absent from target and prediction
    present = union > 0
    gt = conf.sum(1)
    acc = inter / gt
    k = len(class_names)
    return {
        "miou": round(float(iou[present].mean() * 100), 4) if present.any() else float("nan"),
        "miou_paper": round(float((inter / (union + 1e-10)).mean() * 100), 4),
        "per_class_iou": [round(float(v) * 100, 4) if p else None for v, p in zip(iou, present)],
        "macc": round(float(acc[gt > 0].mean() * 100), 4) if (gt > 0).any() else float("nan"),
        "per_class_acc": [round(float(v) * 100, 4) if n > 0 else None for v, n in zip(acc, gt)],
        "pixel_acc": round(float(inter.sum() / conf.sum().clamp(min=1) * 100), 4),
        "num_classes": k,
        "class_names": list(class_names),
        "confusion": counts.tolist(),
    }


@torch.no_grad()
def evaluate(model, cfg: dict, dataset, env: DistEnv, workers: int = 2, progress=None) -> dict:
    """Evaluate on `dataset` (mode "val"): each process takes every world-th image (no padding, so no
    image counts twice), confusion matrices are summed across processes."""
    from semiseg_cli.data.facts import class_names

    was_training = model.training
    model.eval()
    k = cfg["dataset"]["num_classes"]
    indices = list(range(env.rank, len(dataset), env.world))
    # its own generator: worker seeding must not draw from the global RNG that training's dropout uses,
    # so how often a run evaluates does not change its weights
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=indices, num_workers=workers,
                                         pin_memory=env.device.type == "cuda", generator=torch.Generator())
    conf = torch.zeros(k, k, dtype=torch.long, device=env.device)
    it = progress(loader, total=len(indices), desc="eval") if progress else loader
    amp = autocast_for(cfg, env)
    given = cfg["eval"]["image_labels"] == "given" and own_inference(model)
    for x, y, index in it:
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        labels = given_labels(dataset, int(index), y, k) if given else None
        with amp:
            scores = predict(model, normalize(x), cfg, out_size=y.shape[-2:], labels=labels)
        if cfg["eval"]["crf"]:
            scores = crf_refine(x[0], probabilities(scores, cfg, model)[0], cfg)[None]
        conf += confusion(scores.argmax(1), y, k)
    all_reduce_sum(conf)
    model.train(was_training)
    out = metrics(conf, class_names(cfg["dataset"]["name"], cfg["dataset"]["root"]))
    out.update(images=len(dataset), mode=cfg["eval"]["mode"])
    return out


def given_labels(dataset, index: int, y: torch.Tensor, k: int) -> torch.Tensor:
    """The classes [1, K-1] an evaluated image may hold under `eval.image_labels: given` (SLRNet's
    --use_cls_label 1): its line of the dataset's image-label file, else its ground-truth mask's classes."""
    from semiseg_cli.data.dataset import image_classes

    return image_classes(dataset, index, y[0].cpu().numpy()).to(y.device)[None]


def crf_refine(image: torch.Tensor, probs: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Dense-CRF marginals (the `crf` section) of probabilities [K, H, W] for a uint8 image [3, h, w] (resized
    to the probabilities' size when they differ)."""
    import cv2
    import numpy as np

    from semiseg_cli.crf import dense_crf

    img = image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    h, w = probs.shape[-2:]
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    out = dense_crf(img, probs.float().cpu().numpy(), **cfg["crf"])
    return torch.from_numpy(out).to(probs.device)


def autocast_for(cfg: dict, env: DistEnv):
    """bf16/fp16 autocast on CUDA; fp32 elsewhere (CPU autocast would only slow the small CPU runs)."""
    amp = cfg["train"]["amp"]
    if env.device.type == "cuda" and amp != "off":
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return torch.autocast("cpu", enabled=False)


def iou_table(result: dict):
    """A rich table of per-class IoU plus the summary rows."""
    from rich.table import Table

    def cell(v):
        return "absent" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    table = Table("class", "IoU %", "acc %", box=None, pad_edge=False)
    accs = result.get("per_class_acc") or [None] * len(result["class_names"])  # eval.json of older runs: no acc
    for name, v, a in zip(result["class_names"], result["per_class_iou"], accs):
        table.add_row(name, cell(v), cell(a))
    table.add_row("[bold]mIoU[/bold]", f"[bold]{result['miou']:.2f}[/bold]", "")
    table.add_row("mIoU (paper: absent = 0)", f"{result['miou_paper']:.2f}", "")
    if "macc" in result:
        table.add_row("mAcc", "", cell(result["macc"]))
    table.add_row("pixel acc", "", f"{result['pixel_acc']:.2f}")
    return table
