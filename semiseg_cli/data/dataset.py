"""The segmentation dataset: one class for every sample function (labeled, unlabeled, validation).

Tensor names: see the legend in semiseg_cli/data/streams.py.

A sample is addressed by an int index or by a key from the trainer's sampler: `(epoch, position)` (item
position % len) or `(epoch, position, index)` (the item the stream's visiting rule chose, see
`streams.stream_index`). Its augmentation is drawn from a `random.Random` seeded by (seed, epoch,
position), so it does not depend on the worker that loads it, and every copy of a tiled labeled image
gets its own crop.
"""
from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from semiseg_cli.data import transforms as T
from semiseg_cli.data.facts import IGNORE_INDEX, dataset_info
from semiseg_cli.data.reader import load_image, load_mask
from semiseg_cli.data.splits import read_split, split_path
from semiseg_cli.data.streams import STREAMS
from semiseg_cli.errors import UserError

DEFAULT_SAMPLE = {"labeled": "train_l", "unlabeled": "train_u", "val": "val", "ood": "train_u_ood",
                  "tagged": "train_tagged", "captions": "train_caption"}


class SegDataset(Dataset):
    """Samples of one split list.

    Args:
        root: dataset root; split paths are relative to it.
        items: (image, mask or None) pairs, root-relative.
        mode: the sample function (SAMPLES): "train_l" -> (x, y); "train_u" -> (u_w, u_s1, u_s2, ign, box1,
            box2); "val" -> (x, y, index).
        num_classes: labels must be < num_classes or 255.
        crop_size: training crop (square).
        resize: "long" (UniMatch) or "short" (SemiVL/mmseg) training rescale.
        scale_range, img_scale: rescale parameters (see transforms).
        eval_resize: `transforms.eval_resize` arguments for val images (not masks), e.g. {"short": 512}.
        reduce_zero_label: ADE20K label convention.
        seed: base seed of the augmentation.
        image_labels: image id (file stem) -> its foreground classes (SLRNet's tags; `data/image_labels.py`), or
            None: an image's classes are read from its mask.
        pixel_labeled: per item, whether its mask is a pixel label the method may learn from (SLRNet's semi
            variants), or None: none is.
        crop_scale: the RandomResizedCrop area range of SLRNet's samples.
        tags: whether SLRNet's samples carry image-level labels (not in its variant without them).
    """

    def __init__(self, root, items, mode: str, num_classes: int, crop_size: int = 321, resize: str = "long",
                 scale_range=(0.5, 2.0), img_scale=(2048, 512), eval_resize: dict | None = None,
                 reduce_zero_label: bool = False, seed: int = 0, image_labels: dict | None = None,
                 pixel_labeled: list | None = None, crop_scale=(0.9, 1.0), tags: bool = True):
        if mode not in SAMPLES:
            raise ValueError(f"mode {mode!r} is not one of {list(SAMPLES)}")
        self.root, self.items, self.mode = Path(root), list(items), mode
        self.num_classes, self.crop_size, self.resize = num_classes, crop_size, resize
        self.scale_range, self.img_scale = tuple(scale_range), tuple(img_scale)
        self.eval_resize, self.reduce_zero_label, self.seed = eval_resize or {}, reduce_zero_label, seed
        self.image_labels, self.pixel_labeled, self.crop_scale = image_labels, pixel_labeled, tuple(crop_scale)
        self.tags = tags

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
        if isinstance(key, tuple):
            epoch, position, *index = key
            index = index[0] if index else position % len(self.items)
        else:
            epoch, position, index = 0, key, key
        img, mask = self.load(index)
        rng = random.Random(f"{self.seed}-{epoch}-{position}")
        return SAMPLES[self.mode](self, img, mask, rng, index)

    def train_crop(self, img, mask, rng, pad: int):
        """The geometric training augmentation: rescale (UniMatch's long side or SemiVL's short side),
        pad with `pad` and crop to crop_size, random horizontal flip."""
        if self.resize == "short":
            img, mask = T.resize_short(img, mask, rng, self.img_scale, self.scale_range)
        else:
            img, mask = T.resize_long(img, mask, rng, self.scale_range)
        img, mask = T.crop(img, mask, self.crop_size, rng, pad)
        return T.hflip(img, mask, rng)


def sample_labeled(ds: SegDataset, img, mask, rng, index):
    """(x, y): the augmented labeled crop and its mask (padding 255)."""
    img, mask = ds.train_crop(img, mask, rng, T.PAD_LABELED)
    return T.to_uint8_tensor(img), T.to_mask_tensor(mask)


def sample_unlabeled(ds: SegDataset, img, mask, rng, index):
    """(u_w, u_s1, u_s2, ign, box1, box2): the weak crop, two strong views of it, its padding mask and two
    CutMix boxes."""
    img, mask = ds.train_crop(img, mask, rng, T.PAD_UNLABELED)
    ign = torch.from_numpy(np.where(np.asarray(mask) == T.PAD_UNLABELED, IGNORE_INDEX, 0).astype(np.int64))
    u_s1, u_s2 = T.strong(img, rng), T.strong(img, rng)
    box1, box2 = T.cutmix_box(ds.crop_size, rng), T.cutmix_box(ds.crop_size, rng)
    return T.to_uint8_tensor(img), T.to_uint8_tensor(u_s1), T.to_uint8_tensor(u_s2), ign, box1, box2


def sample_ood(ds: SegDataset, img, mask, rng, index):
    """(o_w, o_y, o_s1, o_s2, o_ign): an out-of-distribution image augmented as the unlabeled ones (same
    rescale, crop and flip; two strong views), its pseudo-label, and the ignore mask = 255 where the label is
    255 (crop padding, or pixels the labeler left unlabeled), whose label then reads 0 (a valid class index
    for the per-pixel CE; the ignore mask removes it), as SemiOVS does. Its OOD sample also draws CutMix boxes
    it never uses; they are not drawn here."""
    img, mask = ds.train_crop(img, mask, rng, T.PAD_LABELED)
    y = T.to_mask_tensor(mask)
    ign = torch.where(y == IGNORE_INDEX, IGNORE_INDEX, 0)
    y = torch.where(y == IGNORE_INDEX, 0, y)
    o_s1, o_s2 = T.strong(img, rng), T.strong(img, rng)
    return T.to_uint8_tensor(img), y, T.to_uint8_tensor(o_s1), T.to_uint8_tensor(o_s2), ign


def image_classes(ds: SegDataset, index: int, mask) -> torch.Tensor:
    """The multi-hot foreground classes [K - 1] of item `index` (class c at position c - 1): from
    `ds.image_labels` by the image's stem, else from its whole mask before any crop (SLRNet's training labels)."""
    from semiseg_cli.data.image_labels import labels_from_mask

    image_rel, mask_rel = ds.items[index]
    if ds.image_labels is not None:
        stem = Path(image_rel).stem
        if stem not in ds.image_labels:
            raise UserError(f"{image_rel}: no line for {stem!r} in the image-label file (dataset.image_labels); "
                            "add it, or set dataset.image_labels=null to read the classes from the masks")
        classes = ds.image_labels[stem]
    elif mask_rel is None:
        raise UserError(f"{image_rel}: no mask to read its image-level labels from; give the split lines masks or "
                        "set dataset.image_labels=FILE ('<id> <class>...' lines, e.g. prepare-data's image_labels.txt)")
    else:
        classes = labels_from_mask(np.asarray(mask), ds.num_classes)
    out = torch.zeros(ds.num_classes - 1)
    out[[c - 1 for c in classes]] = 1
    return out


def sample_tagged(ds: SegDataset, img, mask, rng, index):
    """(t, t_y, cls, has_mask): SLRNet's sample: RandomResizedCrop (area ds.crop_scale, bicubic), flip, colour
    jitter (0.3, 0.3, 0.3, 0.1) always; its image-level classes (`image_classes`); its mask where the item is
    pixel-labelled, else all 255, with the flag saying which."""
    labeled = bool(ds.pixel_labeled and ds.pixel_labeled[index])
    cls = image_classes(ds, index, mask) if ds.tags else torch.zeros(ds.num_classes - 1)
    img, mask = T.random_resized_crop(img, mask, ds.crop_size, rng, ds.crop_scale)
    img, mask = T.hflip(img, mask, rng)
    img = T.color_jitter(img, rng, 0.3, 0.3, 0.3, 0.1)
    y = T.to_mask_tensor(mask) if labeled else torch.full((ds.crop_size, ds.crop_size), IGNORE_INDEX, dtype=torch.long)
    return T.to_uint8_tensor(img), y, cls, torch.tensor(labeled)


def sample_val(ds: SegDataset, img, mask, rng, index):
    """(x, y, index): the whole image (short side resized for SemiVL) and its full-size mask."""
    img = T.eval_resize(img, **ds.eval_resize)
    return T.to_uint8_tensor(img), T.to_mask_tensor(mask), index


# sample function of each mode (the tensor kinds they return: data/streams.py SAMPLE_KINDS)
SAMPLES = {"train_l": sample_labeled, "train_u": sample_unlabeled, "val": sample_val, "train_u_ood": sample_ood,
           "train_tagged": sample_tagged}


def build_dataset(cfg: dict, split: str, sample: str | None = None, seed_offset: int = 0) -> SegDataset:
    """The dataset of split list `split` ("labeled", "unlabeled", "val", "ood": dataset.ood_list under
    dataset.ood_root, or "tagged": SLRNet's, see `tagged_items`) described by a resolved config, making samples
    with `sample` (default: the list's own: train_l, train_u, val, train_u_ood, train_tagged)."""
    ds, tr = cfg["dataset"], cfg["train"]
    root = ds["root"]
    labels = ds["image_labels"]
    if labels:
        from semiseg_cli.data.image_labels import read_image_labels

        labels = read_image_labels(Path(root) / labels, ds["num_classes"])
    if split == "tagged":
        items, pixel_labeled = tagged_items(cfg)
        return SegDataset(root, items, sample or DEFAULT_SAMPLE[split], ds["num_classes"], crop_size=tr["crop_size"],
                          reduce_zero_label=dataset_info(ds["name"])["reduce_zero_label"], seed=tr["seed"] + seed_offset,
                          image_labels=labels, pixel_labeled=pixel_labeled, crop_scale=cfg["slrnet"]["crop_scale"],
                          tags=cfg["slrnet"]["variant"] != "semi_nocls")
    if split == "ood":
        if not ds["ood_list"] or not ds["ood_root"]:
            raise UserError("this method reads out-of-distribution images: set dataset.ood_list=FILE (a "
                            "`gen-pseudo --list` file) and dataset.ood_root=DIR (its --root)")
        path, root = Path(ds["ood_list"]), ds["ood_root"]
    else:
        path = split_path(ds["name"], ds["split"], split, root, ds["eval_split"])
    items = read_split(path, need_masks=split != "unlabeled")
    return SegDataset(
        root, items, sample or DEFAULT_SAMPLE[split], ds["num_classes"], crop_size=tr["crop_size"],
        resize=tr["resize"], scale_range=tr["scale_range"], img_scale=tr["img_scale"],
        eval_resize=T.eval_resize_of(cfg), reduce_zero_label=dataset_info(ds["name"])["reduce_zero_label"],
        seed=tr["seed"] + seed_offset, image_labels=labels,
    )


def tagged_items(cfg: dict) -> tuple[list, list | None]:
    """SLRNet's training list and which items are pixel-labelled: slrnet.variant wss reads the labeled and the
    unlabeled list of the split as tagged images (no pixel label used); the semi variants read the unlabeled list
    (tagged, or plain in semi_nocls) plus the labeled list slrnet.oversample times, pixel-labelled (VOC 1464:
    9,118 + 3 x 1,464 = 13,510 and 9,118 + 7 x 1,464 = 19,366 per epoch). The original chose its pixel-labelled
    images as the last 1,464 lines of its train_aug list, which hold only 463 of VOC's 1,464 `train` images (a
    bug, specs/slrnet_s4mc.md A2.5); here they are the split's labeled list, chosen by id."""
    ds = cfg["dataset"]
    path = partial(split_path, ds["name"], ds["split"], root=ds["root"])
    labeled = read_split(path(kind="labeled"))
    unlabeled = read_split(path(kind="unlabeled"), need_masks=False)
    if cfg["slrnet"]["variant"] == "wss":
        return labeled + unlabeled, None
    n = cfg["slrnet"]["oversample"]
    return unlabeled + labeled * n, [False] * len(unlabeled) + [True] * (len(labeled) * n)


def build_stream(cfg: dict, name: str):
    """The dataset of training stream `name` (data/streams.py STREAMS): a SegDataset, or for the image-caption
    pairs a data/pairs.py CaptionDataset."""
    stream = STREAMS[name]
    if stream.list == "captions":
        from semiseg_cli.data.pairs import build_caption_dataset

        return build_caption_dataset(cfg, stream.seed_offset)
    return build_dataset(cfg, stream.list, stream.sample, stream.seed_offset)
