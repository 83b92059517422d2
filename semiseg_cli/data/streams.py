"""The training streams, as data: which list a stream reads, how a sample is made, the names of its tensors,
its augmentation seed offset and whether it defines the epoch.

A method names its streams in `LOADERS`; the trainer builds one dataset and one sampler per stream from
this table and knows no stream by name. Adding a stream is one entry here (plus, if its samples are new,
one sample function in `data/dataset.py`'s `SAMPLES`).

Tensor legend (UniMatch's names, used throughout the project):
    x     labeled image           y     its mask (255 = ignore)
    u_w   weak view of an unlabeled image (geometric augmentation only)
    u_s1, u_s2  two strong views (photometric augmentation on the same crop)
    ign   ignore mask of the unlabeled crop (255 = padding)
    box1, box2  CutMix boxes of the strong views
    fp    feature-perturbed prediction (made in the model, not here)
    *_mix the same for the CutMix source batch
    o_w, o_s1, o_s2, o_ign  an out-of-distribution image (SemiOVS): weak view, strong views, ignore mask
    o_y   its offline pseudo-label (e.g. `gen-pseudo --model sed`); 255 = ignore, as padding
    t, t_y  an image with image-level labels (SLRNet) and its mask (all 255 unless it is pixel-labelled)
    cls   its image-level labels [B, K - 1] (multi-hot, class c at c - 1)
    has_mask  whether t_y is a pixel label (SLRNet's semi variants)
    c, c_ids, c_mask  an image of an image-caption pair, its caption's token ids and attention mask (SimSeg)

Epochs and visiting rules (`stream_index`): the epoch is the length of the first stream that defines it
(the unlabeled list for the SSL methods, the labeled list for supervised training). Every stream gets the
trainer's per-epoch permutation of epoch positions; a stream shorter than the epoch is tiled (position %
its length, as UniMatch tiles the labeled list to the unlabeled length); a longer one is read through its
own seeded permutations, one per pass over it, so a list N times the epoch is fully visited every N epochs
instead of only its first items. A key (epoch, position, index) is a pure function of the iteration, so a
resumed run reads the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# what each tensor of a sample is, per sample function (see data/dataset.py SAMPLES)
SAMPLE_KINDS: dict[str, tuple[str, ...]] = {
    "train_l": ("image", "label"),
    "train_u": ("image", "image", "image", "ignore", "box", "box"),
    "val": ("image", "label", "index"),
    "train_u_ood": ("image", "label", "image", "image", "ignore"),
    "train_tagged": ("image", "label", "classes", "flag"),
    "train_caption": ("image", "tokens", "tokens"),
}


@dataclass(frozen=True)
class Stream:
    """One training stream.

    list: the split list it reads: "labeled" | "unlabeled" | "val" of the configured dataset split, "ood"
        (dataset.ood_list under dataset.ood_root), "tagged" (SLRNet's: data/dataset.py `tagged_items`) or
        "captions" (image-caption pairs, captions.path: data/pairs.py).
    sample: the sample function (a key of SAMPLE_KINDS / data.dataset.SAMPLES).
    keys: the batch names of the sample's tensors, in order.
    seed_offset: added to train.seed for its augmentation (0 = the same draws as another stream).
    defines_epoch: the first stream of a method with this set gives the epoch length.
    mix_source: the CutMix source, whose order `ssl.mix_source` sets (`independent_order`).
    """
    list: str
    sample: str
    keys: tuple[str, ...]
    seed_offset: int = 0
    defines_epoch: bool = False
    mix_source: bool = False


STREAMS: dict[str, Stream] = {
    "labeled": Stream("labeled", "train_l", ("x", "y")),
    "unlabeled": Stream("unlabeled", "train_u", ("u_w", "u_s1", "u_s2", "ign", "box1", "box2"), defines_epoch=True),
    # UniMatch's CutMix source: the same images in the same order (its two samplers share seed and epoch),
    # augmented independently
    "unlabeled_mix": Stream("unlabeled", "train_u", ("u_w_mix", "u_s1_mix", "u_s2_mix", "ign_mix", "box1_mix",
                                                    "box2_mix"), seed_offset=1, mix_source=True),
    # SemiOVS's out-of-distribution images with their open-vocabulary pseudo-labels (own list and root;
    # tiled when shorter than the epoch, fully visited when longer)
    "ood": Stream("ood", "train_u_ood", ("o_w", "o_y", "o_s1", "o_s2", "o_ign"), seed_offset=7),
    # SLRNet's images with their image-level labels (and, in its semi variants, pixel labels)
    "tagged": Stream("tagged", "train_tagged", ("t", "t_y", "cls", "has_mask"), defines_epoch=True),
    # SimSeg's image-caption pairs (data/pairs.py)
    "captions": Stream("captions", "train_caption", ("c", "c_ids", "c_mask"), defines_epoch=True),
}


def independent_order(cfg: dict, name: str) -> bool:
    """Whether stream `name` follows its own per-epoch permutation instead of the shared one."""
    return STREAMS[name].mix_source and cfg["ssl"]["mix_source"] == "shuffled"


def key_kinds(names) -> dict[str, str]:
    """batch key -> "image" | "label" | "ignore" | "box" | "classes" | "flag" | "tokens" for the streams `names`."""
    return {k: kind for n in names for k, kind in zip(STREAMS[n].keys, SAMPLE_KINDS[STREAMS[n].sample])}


def epoch_stream(names) -> str:
    """The stream whose list length is the epoch: the first that defines it, else the first."""
    return next((n for n in names if STREAMS[n].defines_epoch), names[0])


@lru_cache(maxsize=4)
def _pass_order(n: int, seed: int, cycle: int) -> np.ndarray:
    return np.random.default_rng([seed, cycle, n]).permutation(n)


def stream_index(epoch: int, position: int, epoch_len: int, n: int, seed: int, own_order: bool = False) -> int:
    """The item of a stream of `n` items at `position` of `epoch` (epochs of `epoch_len` positions):
    tiled when n <= epoch_len, else the (epoch x epoch_len + position)-th item of a sequence of seeded
    permutations of the n items. `own_order`: the position is first moved by the stream's own seeded
    permutation of the epoch's positions (an independently shuffled stream)."""
    if own_order:
        position = int(_pass_order(epoch_len, seed + 7919, epoch)[position])
    if n <= epoch_len:
        return position % n
    cycle, offset = divmod(epoch * epoch_len + position, n)
    return int(_pass_order(n, seed, cycle)[offset])


def fake_batch(names=tuple(STREAMS), n: int = 2, size: int = 32, num_classes: int = 6, seed: int = 0,
               device="cpu", pad_rows: int = 4) -> dict:
    """A random batch with every tensor of the streams `names` (tests and benchmarks): normalised-looking
    images, labels < num_classes, the last `pad_rows` rows marked as padding, one CutMix box."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for key, kind in key_kinds(names).items():
        if kind == "label":
            t = torch.randint(0, num_classes, (n, size, size), generator=g)
        elif kind == "ignore":
            t = torch.zeros(n, size, size, dtype=torch.long)
            if pad_rows:
                t[:, -pad_rows:] = 255
        elif kind == "classes":
            t = (torch.rand(n, num_classes - 1, generator=g) < 0.4).float()
        elif kind == "flag":
            t = torch.arange(n) % 2 == 0
        elif kind == "tokens":  # [CLS] w w ... [SEP] [PAD]...: ids 5..num_classes + 4 (a vocabulary's words)
            t = torch.zeros(n, 8, dtype=torch.long)
            t[:, :6] = torch.randint(5, num_classes + 5, (n, 6), generator=g)
            t[:, 0], t[:, 5] = 2, 3
            t = (t > 0).long() if key.endswith("_mask") else t
        elif kind == "box":
            t = torch.zeros(n, size, size)
            t[:, size // 8: size * 5 // 8, size // 4: size * 3 // 4] = 1
        else:
            t = torch.randn(n, 3, size, size, generator=g)
        batch[key] = t.to(device)
    return batch
