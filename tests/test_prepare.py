"""prepare-data converters, on real sample files where possible (shared/data is read, never copied in)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from semiseg_cli.data.prepare import make_camvid_splits, prepare, rle_counts_from_string, write_camvid_splits
from semiseg_cli.data.splits import read_split
from semiseg_cli.errors import UserError
from semiseg_cli.resources import resource_dir


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: detects any change to the source."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------- CamVid

@pytest.fixture(scope="module")
def camvid_run(shared_data, tmp_path_factory):
    src = shared_data / "camvid"
    root = tmp_path_factory.mktemp("camvid") / "root"
    before = _listing(src)
    first = prepare("camvid", src, root)
    second = prepare("camvid", src, root)
    return src, root, before, first, second


def test_camvid_masks_remapped_and_source_untouched(camvid_run):
    src, root, before, first, _ = camvid_run
    names = {s: sorted(p.name for p in (src / s).glob("*.png")) for s in ("train", "val")}
    assert (len(names["train"]), len(names["val"])) == (367, 101)
    assert first["written"] == 2 * (367 + 101) and first["skipped"] == 0
    assert first["missing"] == 0 and first["expected"] == 2 * (367 + 101)
    for split, files in names.items():
        for name in files:
            link = root / split / name
            assert link.is_symlink() and os.path.isabs(os.readlink(link))
            assert link.resolve() == (src / split / name).resolve()
            raw = np.array(Image.open(src / f"{split}annot" / name))
            out = np.array(Image.open(root / f"{split}annot" / name))
            assert np.array_equal(out, np.where(raw == 11, 255, raw))
    assert _listing(src) == before


def test_camvid_second_run_skips_everything(camvid_run):
    *_, first, second = camvid_run
    assert second["written"] == 0 and second["skipped"] == first["written"]
    assert second["missing"] == 0


def test_packaged_camvid_splits_match_the_generator(shared_data, tmp_path):
    src = shared_data / "camvid"
    train = [p.stem for p in (src / "train").glob("*.png")]
    val = [p.stem for p in (src / "val").glob("*.png")]
    splits = make_camvid_splits(train)
    sizes = [len(splits[f"1_{k}/labeled"]) for k in (16, 8, 4, 2)]
    assert sizes == [23, 46, 92, 184]
    assert splits["1_8/labeled"][:23] == splits["1_16/labeled"]  # nested prefixes
    assert sorted(splits["1_4/labeled"] + splits["1_4/unlabeled"]) == sorted(train)
    write_camvid_splits(train, val, tmp_path)
    packaged = resource_dir("splits") / "camvid"
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.txt"))
    assert made == sorted(p.relative_to(packaged) for p in packaged.rglob("*.txt"))
    for rel in made:
        assert (packaged / rel).read_text() == (tmp_path / rel).read_text(), rel


# ------------------------------------------------------------------------------------ Cityscapes

def test_cityscapes_label_ids_to_train_ids(shared_data, tmp_path):
    sample = shared_data / "cityscapes_sample"
    stem = "val/frankfurt/frankfurt_000000_000294"
    src = tmp_path / "src"
    for rel in (f"leftImg8bit/{stem}_leftImg8bit.png", f"gtFine/{stem}_gtFine_labelIds.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample / rel, src / rel)
    summary = prepare("cityscapes", src, tmp_path / "root", allow_partial=True)
    assert summary["written"] == 2 and summary["missing"] > 0
    out = np.array(Image.open(tmp_path / "root" / f"gtFine/{stem}_gtFine_labelTrainIds.png"))
    shipped = np.array(Image.open(sample / f"gtFine/{stem}_gtFine_labelTrainIds.png"))
    assert out.shape == shipped.shape and (out != shipped).sum() <= 100  # README: 77 differ (downscaling)
    assert set(np.unique(out).tolist()) <= set(range(19)) | {255}
    assert (tmp_path / "root" / f"leftImg8bit/{stem}_leftImg8bit.png").is_symlink()


# ------------------------------------------------------------------------------------------- VOC

def test_voc_and_sbd_masks(shared_data, tmp_path):
    samples = shared_data / "voc_samples"
    ids = [Path(image).stem for image, _ in read_split(resource_dir("splits") / "voc" / "val.txt")][:5]
    voc, sbd = tmp_path / "src/VOCdevkit/VOC2012", tmp_path / "src/benchmark_RELEASE/dataset"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", sbd / "img", sbd / "cls"):
        d.mkdir(parents=True)
    # (sample, id, mask in VOC, mask in SBD, image in VOC JPEGImages, image in SBD img/)
    plan = [(0, ids[0], True, False, True, False), (1, ids[1], True, False, True, False),
            (8, ids[2], False, True, True, True), (20, ids[3], False, True, False, True),
            (23, ids[4], True, True, True, True)]
    labels = {}
    for n, id_, in_voc, in_sbd, img_voc, img_sbd in plan:
        image = Image.open(samples / f"{n}_image.png").convert("RGB")
        labels[id_] = np.array(Image.open(samples / f"{n}_label.png"))
        for wanted, folder in ((img_voc, voc / "JPEGImages"), (img_sbd, sbd / "img")):
            if wanted:
                image.save(folder / f"{id_}.jpg", quality=90)
        if in_voc:
            shutil.copy(samples / f"{n}_label.png", voc / "SegmentationClass" / f"{id_}.png")
        if in_sbd:  # where VOC also has the id, SBD says "all background": VOC must win
            seg = np.zeros_like(labels[id_]) if in_voc else labels[id_]
            savemat(sbd / "cls" / f"{id_}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.array([1])}})
    root = tmp_path / "root"
    summary = prepare("voc", tmp_path / "src", root, allow_partial=True)
    assert summary["written"] == 10 and summary["missing"] == summary["expected"] - 10
    for id_, label in labels.items():
        out = Image.open(root / "SegmentationClass" / f"{id_}.png")
        assert out.mode == "P" and np.array_equal(np.array(out), label)
    assert (root / "JPEGImages" / f"{ids[2]}.jpg").resolve() == (voc / "JPEGImages" / f"{ids[2]}.jpg").resolve()
    assert (root / "JPEGImages" / f"{ids[3]}.jpg").resolve() == (sbd / "img" / f"{ids[3]}.jpg").resolve()
    with pytest.raises(UserError) as excinfo:
        prepare("voc", tmp_path / "src", root)
    msg = _one_line_error(excinfo)
    assert f"{summary['missing']} of {summary['expected']}" in msg and "--allow-partial" in msg


# ------------------------------------------------------------------------------------------ COCO

def _rle_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of 0s, as COCO stores them."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def _rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString, written independently of the decoder under test."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_rle_string_roundtrip():
    assert rle_counts_from_string("32") == [3, 2]
    counts = [10, 200, 30, 5, 7000, 1, 0, 64]  # includes negative deltas and multi-char numbers
    assert rle_counts_from_string(_rle_string(counts)) == counts


def test_coco_instances_to_masks(shared_data, tmp_path):
    h, w = 30, 40  # not square: catches row/column-major mix-ups
    src = tmp_path / "src"
    for split, n, id_ in (("train2017", 0, 1), ("val2017", 1, 2)):
        (src / split).mkdir(parents=True)
        image = Image.open(shared_data / "voc_samples" / f"{n}_image.png").convert("RGB").resize((w, h))
        image.save(src / split / f"{id_:012d}.jpg")
    person = np.zeros((h, w), bool)
    person[20:26, 25:36] = True
    crowd = np.zeros((h, w), bool)
    crowd[:, 30:40] = True
    brush = np.zeros((h, w), bool)
    brush[0:10, 0:5] = True
    cat_ids = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
    assert len(cat_ids) == 80
    categories = [{"id": c, "name": str(c)} for c in reversed(cat_ids)]  # order in the file must not matter
    train_anns = [  # the small car comes first in the file but must end up on top of the larger dog
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 9, "segmentation": [[8, 8, 11, 8, 11, 11, 8, 11]]},
        {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 100, "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 66,
         "segmentation": {"size": [h, w], "counts": _rle_string(_rle_counts(person))}},
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 300,
         "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}},
    ]
    val_anns = [{"id": 5, "image_id": 2, "category_id": 90, "iscrowd": 0, "area": 50,
                 "segmentation": {"size": [h, w], "counts": _rle_counts(brush)}}]
    (src / "annotations").mkdir()
    for split, id_, anns in (("train2017", 1, train_anns), ("val2017", 2, val_anns)):
        doc = {"images": [{"id": id_, "file_name": f"{id_:012d}.jpg", "height": h, "width": w}],
               "annotations": anns, "categories": categories}
        (src / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    root = tmp_path / "root"
    prepare("coco", src, root, allow_partial=True)

    m1 = np.array(Image.open(root / "masks" / "000000000001.png"))
    assert m1.shape == (h, w)
    assert m1[13, 13] == 17 and m1[14, 6] == 17  # dog (category 18) is the 17th sorted id
    assert m1[9, 9] == 3 and m1[10, 8] == 3  # the smaller car is drawn over the dog
    assert (m1[20:26, 25:36] == 1).all()  # compressed RLE person, also where the crowd overlaps it
    assert (m1[crowd & ~person] == 255).all()  # crowd-only pixels are ignored
    assert m1[0, 0] == 0 and m1[28, 2] == 0
    m2 = np.array(Image.open(root / "masks" / "000000000002.png"))
    assert (m2[brush] == 80).all() and (m2[~brush] == 0).all()  # category 90 is the last class
    assert (root / "train2017" / "000000000001.jpg").is_symlink()
    assert (root / "val2017" / "000000000002.jpg").is_symlink()

    coco_splits = sorted(p.parent.name for p in (resource_dir("splits") / "coco").glob("*/labeled.txt"))
    assert coco_splits
    for split in coco_splits:
        text = (root / "splits" / split / "unlabeled.txt").read_text()
        assert text == "train2017/000000000001.jpg masks/000000000001.png\n"
    again = prepare("coco", src, root, allow_partial=True)
    assert again["written"] == 0


# ------------------------------------------------------------------------------------- bad input

def _small_camvid(tmp_path: Path, mask_bytes: bytes | None = None, image_bytes: bytes | None = None) -> Path:
    src = tmp_path / "CamVid"
    for d in ("train", "trainannot"):
        (src / d).mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(src / "train" / "a.png")
    Image.fromarray(np.full((6, 8), 11, np.uint8)).save(src / "trainannot" / "a.png")
    if mask_bytes is not None:
        (src / "trainannot" / "a.png").write_bytes(mask_bytes)
    if image_bytes is not None:
        (src / "train" / "a.png").write_bytes(image_bytes)
    return src


def test_missing_src(tmp_path):
    with pytest.raises(UserError) as excinfo:
        prepare("camvid", tmp_path / "nowhere", tmp_path / "root")
    assert str(tmp_path / "nowhere") in _one_line_error(excinfo)


@pytest.mark.parametrize("name, expected", [("camvid", "trainannot/"), ("cityscapes", "leftImg8bit/"),
                                            ("voc", "VOCdevkit/VOC2012"), ("ade20k", "annotations/"),
                                            ("coco", "instances_train2017.json")])
def test_src_without_expected_folder(tmp_path, name, expected):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as excinfo:
        prepare(name, tmp_path / "empty", tmp_path / "root")
    msg = _one_line_error(excinfo)
    assert expected in msg and str(tmp_path / "empty") in msg


def test_corrupt_mask_and_image_are_named(tmp_path):
    src = _small_camvid(tmp_path / "m", mask_bytes=b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError) as excinfo:
        prepare("camvid", src, tmp_path / "m" / "root")
    assert str(src / "trainannot" / "a.png") in _one_line_error(excinfo)
    src = _small_camvid(tmp_path / "i", image_bytes=b"<html>404</html>")
    with pytest.raises(UserError) as excinfo:
        prepare("camvid", src, tmp_path / "i" / "root")
    assert str(src / "train" / "a.png") in _one_line_error(excinfo)


def test_partial_camvid_and_wrong_names(tmp_path):
    src = _small_camvid(tmp_path)
    summary = prepare("camvid", src, tmp_path / "root", allow_partial=True)
    assert summary["written"] == 2 and summary["missing"] == summary["expected"]  # a.png is in no split list
    assert (np.array(Image.open(tmp_path / "root" / "trainannot" / "a.png")) == 255).all()
    with pytest.raises(UserError) as excinfo:
        prepare("camvd", src, tmp_path / "root")
    assert "did you mean 'camvid'" in _one_line_error(excinfo)
    with pytest.raises(UserError) as excinfo:
        prepare("camvid", src, src / "out")
    assert "inside" in _one_line_error(excinfo)
    assert not (src / "out").exists()
