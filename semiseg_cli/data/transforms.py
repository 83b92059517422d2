"""Training and evaluation transforms, after UniMatch's `dataset/transform.py` (specs/semivl_unimatch.md §1.1).

Every random choice takes an explicit `random.Random`, so a sample's augmentation is a pure function of
(seed, epoch, index): identical for any number of DataLoader workers and after `--resume`.

Images leave the workers as uint8 CHW tensors; `normalize` (ImageNet mean/std) runs on the device in the
trainer, which moves 4x fewer bytes to the GPU and spares the worker CPUs.
"""
from __future__ import annotations

import math
import random

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD_LABELED = 255  # padded mask pixels of labeled crops: ignored by the loss
PAD_UNLABELED = 254  # padded pixels of unlabeled crops: become the ignore mask (GT values are never used)


def resize_long(img: Image.Image, mask: Image.Image, rng: random.Random, ratio=(0.5, 2.0)):
    """UniMatch `resize`: the long side becomes randint(int(0.5 L), int(2.0 L)) (inclusive)."""
    w, h = img.size
    long_side = rng.randint(int(max(w, h) * ratio[0]), int(max(w, h) * ratio[1]))
    if h > w:
        oh, ow = long_side, int(w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(h * long_side / w + 0.5)
    return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale_size` with keep_ratio: fit (w, h) inside the (long, short) bound `scale`."""
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_short(img: Image.Image, mask: Image.Image, rng: random.Random, img_scale=(2048, 512), ratio=(0.5, 2.0)):
    """SemiVL's training resize (mmseg `Resize(img_scale, ratio_range)`): in practice the short side
    becomes 512 r, r ~ U[0.5, 2.0); cv2 bilinear for the image, nearest for the mask."""
    r = rng.uniform(*ratio)
    size = rescale_size(*img.size, (int(img_scale[0] * r), int(img_scale[1] * r)))
    img = Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_LINEAR))
    mask = Image.fromarray(cv2.resize(np.asarray(mask), size, interpolation=cv2.INTER_NEAREST))
    return img, mask


def resize_short_exact(img: Image.Image, short: int = 512) -> Image.Image:
    """SemiVL's eval resize (mmseg Resize((2048, 512), min_size=512)): the short side becomes `short`."""
    w, h = img.size
    factor = short / min(w, h)
    size = (int(w * factor + 0.5), int(h * factor + 0.5))
    return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_LINEAR))


def eval_resize(img: Image.Image, short: int | None = None, scale=None) -> Image.Image:
    """The evaluation resize of the network input (masks stay at full size): the short side becomes `short`
    (SemiVL), or the image is fitted inside the (long, short) bound `scale` keeping its ratio (mmseg's test
    Resize(img_scale, keep_ratio=True): MaskCLIP's (2048, 512), Pascal Context's (520, 520)); cv2 bilinear."""
    if short:
        return resize_short_exact(img, short)
    if scale:
        size = rescale_size(*img.size, tuple(scale))
        if size != img.size:
            return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_LINEAR))
    return img


def eval_resize_of(cfg: dict) -> dict:
    """The `eval_resize` arguments of a config (eval.resize_short, eval.img_scale)."""
    return {"short": cfg["eval"]["resize_short"], "scale": cfg["eval"]["img_scale"]}


def crop(img: Image.Image, mask: Image.Image, size: int, rng: random.Random, mask_pad: int):
    """Pad right/bottom to at least size x size (image 0, mask `mask_pad`), then a uniform random crop."""
    w, h = img.size
    padw, padh = max(size - w, 0), max(size - h, 0)
    if padw or padh:
        img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
        mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=mask_pad)
    w, h = img.size
    x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    return img.crop((x, y, x + size, y + size)), mask.crop((x, y, x + size, y + size))


def random_resized_crop(img: Image.Image, mask: Image.Image | None, size: int, rng: random.Random, scale=(0.9, 1.0),
                        ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop (its `get_params`: 10 tries of an area fraction in `scale` and a log-uniform
    aspect ratio, else the central crop of the clamped ratio) to size x size: bicubic for the image, nearest for
    the mask (SLRNet's MaskRandResizedCrop); mask None: the image alone (SimSeg's crop)."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:
        in_ratio = w / h
        if in_ratio < min(ratio):
            cw, ch = w, int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            cw, ch = int(round(h * max(ratio))), h
        else:
            cw, ch = w, h
        y, x = (h - ch) // 2, (w - cw) // 2
    box = (x, y, x + cw, y + ch)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    return img if mask is None else (img, mask.resize((size, size), Image.NEAREST, box=box))


def autoaugment(img: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision's AutoAugment with the ImageNet policy (SimSeg's `autoaug`, its PIL ImageNetPolicy), its
    draws (sub-policy, the two operations' probabilities and signs) taken from the sample's `rng` instead of
    torch's global generator, so that a sample's augmentation does not depend on the worker that makes it.
    The policy table, magnitudes and operations are torchvision's own (AutoAugment.forward's steps)."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    aa = AutoAugment(AutoAugmentPolicy.IMAGENET)
    space = aa._augmentation_space(10, (img.height, img.width))
    for op, p, level in aa.policies[rng.randrange(len(aa.policies))]:
        if rng.random() <= p:
            magnitudes, signed = space[op]
            magnitude = float(magnitudes[level]) if level is not None else 0.0
            if signed and rng.random() < 0.5:
                magnitude = -magnitude
            img = _apply_op(img, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return img


def hflip(img: Image.Image, mask: Image.Image, rng: random.Random, p: float = 0.5):
    if rng.random() < p:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def color_jitter(img: Image.Image, rng: random.Random, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25):
    """torchvision ColorJitter semantics (factors in [1-x, 1+x], hue in [-h, h], random order)."""
    ops = [
        (TF.adjust_brightness, rng.uniform(1 - brightness, 1 + brightness)),
        (TF.adjust_contrast, rng.uniform(1 - contrast, 1 + contrast)),
        (TF.adjust_saturation, rng.uniform(1 - saturation, 1 + saturation)),
        (TF.adjust_hue, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(ops)
    for fn, factor in ops:
        img = fn(img, factor)
    return img


def strong(img: Image.Image, rng: random.Random) -> Image.Image:
    """UniMatch's strong photometric view: jitter p 0.8, grayscale p 0.2, Gaussian blur p 0.5 (σ 0.1–2)."""
    if rng.random() < 0.8:
        img = color_jitter(img, rng)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return img


def cutmix_box(size: int, rng: random.Random, p: float = 0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3):
    """UniMatch `obtain_cutmix_box`: a size x size {0,1} float mask holding one box, or all zeros w.p. 1-p."""
    box = np.zeros((size, size), np.float32)  # numpy: per-sample work stays off torch's thread pool
    if rng.random() > p:
        return torch.from_numpy(box)
    area = rng.uniform(size_min, size_max) * size * size
    while True:
        ratio = rng.uniform(ratio_1, ratio_2)
        w, h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
        x, y = rng.randrange(size), rng.randrange(size)
        if x + w <= size and y + h <= size:
            break
    box[y:y + h, x:x + w] = 1
    return torch.from_numpy(box)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [3, H, W] (normalisation happens on the device, see `normalize`).

    The transpose is done by numpy: torch's parallel copy wakes its thread pool for every sample, which
    slows the main-process pipeline badly on a few busy cores (benchmarks/data_pipeline.py)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, np.uint8).transpose(2, 0, 1)))


def to_mask_tensor(mask: Image.Image | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(mask, np.int64, copy=True))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any device) -> float, ImageNet-normalised, like ToTensor + Normalize."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """`normalize`'s inverse, to RGB in [0, 1] (SLRNet's PAMR computes its affinities on the raw image)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.float() * std + mean
