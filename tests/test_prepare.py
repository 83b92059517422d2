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

from semiseg_cli.data.prepare import coco_mask, make_camvid_splits, prepare, write_camvid_splits
from semiseg_cli.data.splits import read_split
from semiseg_cli.errors import UserError
from semiseg_cli.resources import resource_dir
from tests.conftest import run_cli


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
    assert first["files_missing"] == 0 and first["files_listed"] == 2 * (367 + 101)
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
    assert second["files_missing"] == 0


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
    assert summary["written"] == 2 and summary["files_missing"] > 0
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
    assert summary["written"] == 10 and summary["files_missing"] == summary["files_listed"] - 10
    for id_, label in labels.items():
        out = Image.open(root / "SegmentationClass" / f"{id_}.png")
        assert out.mode == "P" and np.array_equal(np.array(out), label)
    assert (root / "JPEGImages" / f"{ids[2]}.jpg").resolve() == (voc / "JPEGImages" / f"{ids[2]}.jpg").resolve()
    assert (root / "JPEGImages" / f"{ids[3]}.jpg").resolve() == (sbd / "img" / f"{ids[3]}.jpg").resolve()
    with pytest.raises(UserError) as excinfo:
        prepare("voc", tmp_path / "src", root)
    msg = _one_line_error(excinfo)
    assert f"{summary['files_missing']} of {summary['files_listed']}" in msg and "--allow-partial" in msg


# ------------------------------------------------------------------------------------------ COCO

# pycocotools' decode() under numpy 2 (its own code, harmless; hidden outside tests anyway)
_pycocotools_warning = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


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


@_pycocotools_warning
def test_rle_string_helper_matches_pycocotools():
    """The fixtures' RLE strings are what pycocotools writes (they are built without it)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(1)
    blob = np.zeros((37, 53), bool)  # long runs (multi-char counts) and short ones (negative deltas)
    blob[5:30, 10:45] = True
    blob |= rng.random(blob.shape) < 0.05
    counts = _rle_counts(blob)
    assert _rle_string(counts) == mask_utils.encode(np.asfortranarray(blob.astype(np.uint8)))["counts"].decode()
    assert np.array_equal(mask_utils.decode({"size": [37, 53], "counts": _rle_string(counts).encode()}), blob)


@_pycocotools_warning
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


COCO_H, COCO_W = 427, 640  # a common COCO image size, not square
COCO_CAT_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def _random_coco_anns(seed: int = 0, n: int = 50) -> list[dict]:
    """`n` random instances on one COCO_H x COCO_W image, then a compressed-RLE object and an
    uncompressed-RLE crowd. Polygons are star-shaped (mostly concave), every 4th object has 2-3 parts,
    odd ones have float vertices (2 decimals, as in the COCO files), even ones integer vertices."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    h, w = COCO_H, COCO_W
    anns = []
    for i in range(n):
        parts, area = [], 0.0
        for _ in range(int(rng.integers(2, 4)) if i % 4 == 0 else 1):
            k = int(rng.integers(3, 13))
            angle = np.sort(rng.uniform(0, 2 * np.pi, k))
            radius = rng.uniform(4, 120) * rng.uniform(0.3, 1.0, k)
            x = np.clip(rng.uniform(0, w) + radius * np.cos(angle), 0, w)
            y = np.clip(rng.uniform(0, h) + radius * np.sin(angle), 0, h)
            x, y = (np.round(x, 2), np.round(y, 2)) if i % 2 else (np.round(x), np.round(y))
            parts.append(np.stack([x, y], 1).ravel().tolist())
            area += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
        anns.append({"id": i + 1, "image_id": 1, "category_id": int(rng.choice(COCO_CAT_IDS)), "iscrowd": 0,
                     "area": round(area, 2), "segmentation": parts})
    anns[7]["area"] = anns[8]["area"]  # a tie: annotation order decides
    yy, xx = np.mgrid[:h, :w]
    blob = ((xx - 400) / 150.0) ** 2 + ((yy - 200) / 90.0) ** 2 < 1
    anns.append({"id": n + 1, "image_id": 1, "category_id": 44, "iscrowd": 0, "area": float(blob.sum()),
                 "segmentation": {"size": [h, w], "counts": mask_utils.encode(
                     np.asfortranarray(blob.astype(np.uint8)))["counts"].decode()}})
    crowd = (np.abs(xx - 150) < 120) & (np.abs(yy - 300) < 80)
    anns.append({"id": n + 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
                 "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}})
    return anns


def _coco_doc(anns: list[dict]) -> dict:
    return {"images": [{"id": 1, "file_name": "000000000001.jpg", "height": COCO_H, "width": COCO_W}],
            "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in COCO_CAT_IDS]}


def _pycocotools_mask(doc: dict) -> np.ndarray:
    """Image 1's class mask from pycocotools' own COCO.annToMask, painted in coco_mask's documented
    order (non-crowd by decreasing area, stable; crowd -> 255 where no non-crowd instance is)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    coco.createIndex()
    classes = {cid: i + 1 for i, cid in enumerate(sorted(coco.getCatIds()))}
    img = coco.imgs[1]
    mask = np.zeros((img["height"], img["width"]), np.uint8)
    covered = np.zeros(mask.shape, bool)
    crowd = np.zeros(mask.shape, bool)
    for ann in sorted(coco.loadAnns(coco.getAnnIds(imgIds=[1])), key=lambda a: -a["area"]):
        region = coco.annToMask(ann) == 1
        if ann["iscrowd"]:
            crowd |= region
        else:
            mask[region] = classes[ann["category_id"]]
            covered |= region
    mask[crowd & ~covered] = 255
    return mask


@_pycocotools_warning
def test_coco_mask_matches_pycocotools_pixel_for_pixel():
    anns = _random_coco_anns()
    expected = _pycocotools_mask(_coco_doc(anns))
    assert len(np.unique(expected)) > 20 and (expected == 255).any()  # many classes and crowd: not vacuous
    classes = {cid: i + 1 for i, cid in enumerate(COCO_CAT_IDS)}
    got = coco_mask(anns, COCO_H, COCO_W, classes)
    assert got.dtype == np.uint8 and got.shape == (COCO_H, COCO_W)
    assert np.array_equal(got, expected), f"{(got != expected).sum()} pixels differ"


@_pycocotools_warning
def test_prepare_data_coco_cli_writes_pycocotools_masks(tmp_path):
    src, root = tmp_path / "src", tmp_path / "root"
    (src / "val2017").mkdir(parents=True)
    (src / "annotations").mkdir()
    Image.new("RGB", (COCO_W, COCO_H), (90, 120, 60)).save(src / "val2017" / "000000000001.jpg")
    doc = _coco_doc(_random_coco_anns(seed=3))
    (src / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    proc = run_cli("prepare-data", "coco", "--src", src, "--root", root, "--allow-partial", check=0)
    assert json.loads(proc.stdout)["written"] == 2  # the image link and the mask
    written = Image.open(root / "masks" / "000000000001.png")
    assert written.size == (COCO_W, COCO_H)
    expected = _pycocotools_mask(doc)
    assert np.array_equal(np.array(written), expected), f"{(np.array(written) != expected).sum()} pixels differ"

    # an RLE whose size is not the image's is a one-line user error (exit 2) naming file and image
    doc["annotations"][-1]["segmentation"]["size"] = [COCO_W, COCO_H]
    (src / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    proc = run_cli("prepare-data", "coco", "--src", src, "--root", tmp_path / "root2", "--allow-partial", check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "instances_val2017.json" in lines[0] and "000000000001.jpg" in lines[0]
    assert f"RLE size {COCO_W}x{COCO_H} differs" in lines[0]


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
    assert summary["written"] == 2 and summary["files_missing"] == summary["files_listed"]  # a.png is in no split list
    assert (np.array(Image.open(tmp_path / "root" / "trainannot" / "a.png")) == 255).all()
    with pytest.raises(UserError) as excinfo:
        prepare("camvd", src, tmp_path / "root")
    assert "did you mean 'camvid'" in _one_line_error(excinfo)
    with pytest.raises(UserError) as excinfo:
        prepare("camvid", src, src / "out")
    assert "inside" in _one_line_error(excinfo)
    assert not (src / "out").exists()
