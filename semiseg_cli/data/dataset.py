"""The segmentation dataset: one class for labeled, unlabeled and validation samples.

Tensor legend (UniMatch's names, used throughout the project):
    x     labeled image           y     its mask (255 = ignore)
    u_w   weak view of an unlabeled image (geometric augmentation only)
    u_s1, u_s2  two strong views (photometric augmentation on the same crop)
    ign   ignore mask of the unlabeled crop (255 = padding)
    box1, box2  CutMix boxes of the strong views
    fp    feature-perturbed prediction (made in the model, not here)

A sample is addressed by an int index or by an `(epoch, position)` key from the trainer's sampler, where
position indexes the epoch's list (the items tiled to the epoch length) and reads item position % len.
Its augmentation is drawn from a `random.Random` seeded by (seed, epoch, position), so it does not depend
on the worker that loads it, and every copy of a tiled labeled image gets its own crop.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from semiseg_cli.data import transforms as T
from semiseg_cli.data.datasets import dataset_info
from semiseg_cli.data.reader import load_image, load_mask
from semiseg_cli.data.splits import read_split, split_path

MODES = ("train_l", "train_u", "val")


class SegDataset(Dataset):
    """Samples of one split list.

    Args:
        root: dataset root; split paths are relative to it.
        items: (image, mask or None) pairs, root-relative.
        mode: "train_l" -> (x, y); "train_u" -> (u_w, u_s1, u_s2, ign, box1, box2); "val" -> (x, y, index).
        num_classes: labels must be < num_classes or 255.
        crop_size: training crop (square).
        resize: "long" (UniMatch) or "short" (SemiVL/mmseg) training rescale.
        scale_range, img_scale: rescale parameters (see transforms).
        eval_resize_short: resize val images (not masks) so the short side is this (SemiVL: 512).
        reduce_zero_label: ADE20K label convention.
        seed: base seed of the augmentation.
    """

    def __init__(self, root, items, mode: str, num_classes: int, crop_size: int = 321, resize: str = "long",
                 scale_range=(0.5, 2.0), img_scale=(2048, 512), eval_resize_short: int | None = None,
                 reduce_zero_label: bool = False, seed: int = 0):
        assert mode in MODES, mode
        self.root, self.items, self.mode = Path(root), list(items), mode
        self.num_classes, self.crop_size, self.resize = num_classes, crop_size, resize
        self.scale_range, self.img_scale = tuple(scale_range), tuple(img_scale)
        self.eval_resize_short, self.reduce_zero_label, self.seed = eval_resize_short, reduce_zero_label, seed

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """Image and mask of item `index`, checked (size, label range). Unlabeled items without a mask
        get an all-zero mask (only padding is ever read from unlabeled masks)."""
        image_rel, mask_rel = self.items[index]
        img = load_image(self.root / image_rel)
        if mask_rel is None:
            return img, Image.new("L", img.size, 0)
        mask = load_mask(self.root / mask_rel, img.size, self.num_classes, self.reduce_zero_label)
        return img, Image.fromarray(mask)

    def __getitem__(self, key):
        epoch, position = key if isinstance(key, tuple) else (0, key)
        index = position % len(self.items)
        img, mask = self.load(index)
        if self.mode == "val":
            if self.eval_resize_short:
                img = T.resize_short_exact(img, self.eval_resize_short)
            return T.to_uint8_tensor(img), T.to_mask_tensor(mask), index

        rng = random.Random(f"{self.seed}-{epoch}-{position}")
        if self.resize == "short":
            img, mask = T.resize_short(img, mask, rng, self.img_scale, self.scale_range)
        else:
            img, mask = T.resize_long(img, mask, rng, self.scale_range)
        pad = T.PAD_LABELED if self.mode == "train_l" else T.PAD_UNLABELED
        img, mask = T.crop(img, mask, self.crop_size, rng, pad)
        img, mask = T.hflip(img, mask, rng)
        if self.mode == "train_l":
            return T.to_uint8_tensor(img), T.to_mask_tensor(mask)

        ign = torch.from_numpy(np.where(np.asarray(mask) == T.PAD_UNLABELED, 255, 0).astype(np.int64))
        u_s1, u_s2 = T.strong(img, rng), T.strong(img, rng)
        box1, box2 = T.cutmix_box(self.crop_size, rng), T.cutmix_box(self.crop_size, rng)
        return (T.to_uint8_tensor(img), T.to_uint8_tensor(u_s1), T.to_uint8_tensor(u_s2), ign, box1, box2)


def build_dataset(cfg: dict, kind: str, mode: str | None = None) -> SegDataset:
    """The dataset of split list `kind` ("labeled", "unlabeled" or "val") described by a resolved config."""
    ds, tr = cfg["dataset"], cfg["train"]
    mode = mode or {"labeled": "train_l", "unlabeled": "train_u", "val": "val"}[kind]
    path = split_path(ds["name"], ds["split"], kind, ds["root"])
    items = read_split(path, need_masks=kind != "unlabeled")
    return SegDataset(
        ds["root"], items, mode, ds["num_classes"], crop_size=tr["crop_size"], resize=tr["resize"],
        scale_range=tr["scale_range"], img_scale=tr["img_scale"], eval_resize_short=cfg["eval"]["resize_short"],
        reduce_zero_label=dataset_info(ds["name"])["reduce_zero_label"], seed=tr["seed"],
    )
