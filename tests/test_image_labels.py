"""Image-level labels (data/image_labels.py): the text format, the two sources (masks, VOC XML), the
packaged copy of SLRNet's cls_labels.npy, and the files prepare-data writes."""
from __future__ import annotations

import _codecs
import importlib
import io
import pickle
import shutil
from pathlib import Path
from xml.dom import minidom

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from semiseg_cli.data import synthetic
from semiseg_cli.data.facts import SYNTHETIC_CLASSES
from semiseg_cli.data.image_labels import (MASK_LABELS, XML_LABELS, format_image_labels, labels_from_mask,
                                           read_image_labels, shipped_labels, voc_xml_labels, voc_xml_names,
                                           write_image_labels)
from semiseg_cli.data.prepare import prepare, prepare_voc
from semiseg_cli.errors import UserError

# IRN's voc12/dataloader.py CAT_LIST, the names make_cls_labels.py matched the XML <name>s against
ORIGINAL_CAT_LIST = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                     "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                     "tvmonitor"]


# ------------------------------------------------------------------ the original cls_labels.npy, read safely

_MULTIARRAY = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
_NUMPY_GLOBALS = {  # all that a pickled dict of int32 -> float32[20] arrays refers to
    ("numpy.core.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct,
    ("numpy.core.multiarray", "scalar"): _MULTIARRAY.scalar,
    ("numpy._core.multiarray", "scalar"): _MULTIARRAY.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array/scalar reconstruction: no code of the file ever runs."""

    def find_class(self, module, name):
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _read_cls_labels(path: Path) -> dict:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read_header(f)
        assert shape == () and dtype == np.dtype(object)
        array = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    return array.item()


def test_the_restricted_unpickler_refuses_other_globals():
    evil = pickle.dumps(print)  # a global outside numpy's reconstruction
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _NumpyOnlyUnpickler(io.BytesIO(evil)).load()


def test_shipped_xml_labels_equal_slrnets_cls_labels_npy(shared_data):
    original = _read_cls_labels(shared_data / "slrnet" / "voc12" / "cls_labels.npy")
    assert len(original) == 12031
    expected = {}
    for key, vector in original.items():  # keys: int32 2007000032 = "2007_000032"; index i = VOC class i + 1
        digits = str(int(key))
        assert vector.shape == (20,) and set(np.unique(vector).tolist()) <= {0.0, 1.0}
        expected[f"{digits[:4]}_{digits[4:]}"] = tuple(int(i) + 1 for i in np.flatnonzero(vector))
    path = shipped_labels("voc12_xml")
    shipped = read_image_labels(path, 21)
    assert shipped == expected
    # facts one can check by looking at the pictures: aeroplanes + people, a tv monitor, a chair + a dog
    assert shipped["2007_000032"] == (1, 15) and shipped["2007_000039"] == (20,) and shipped["2007_000063"] == (9, 12)
    ids = set(expected)
    for split in ("train_aug", "val"):
        assert set((shared_data / "slrnet" / "voc12" / f"{split}.txt").read_text().split()) <= ids
    text = path.read_text()
    assert text.startswith("# ") and "595e221df2872704318f554cb0876d9b10bb7a00" in text.splitlines()[1]
    assert "Apache-2.0" in text.splitlines()[1] and (path.parent / "LICENSE.slrnet").is_file()
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == sorted(body) and len(body) == 12031


def test_shipped_labels_unknown_name():
    with pytest.raises(UserError, match="voc12_xml"):
        shipped_labels("voc12_xm")


# ----------------------------------------------------------------------------------- the text format

def test_labels_from_mask_skips_background_and_ignore():
    mask = np.zeros((6, 7), np.uint8)
    mask[0] = 255
    mask[2:4, 1:3] = 7
    mask[5, 6] = 3
    assert labels_from_mask(mask, 21) == [3, 7]
    assert labels_from_mask(mask.astype(np.int32), 21) == [3, 7]
    assert labels_from_mask(mask[:, :0], 21) == []
    assert labels_from_mask(np.full((2, 2), 255, np.uint8), 21) == []
    with pytest.raises(ValueError, match="21"):
        labels_from_mask(np.array([[0, 21]], np.uint8), 21)


def test_format_write_and_read_back(tmp_path):
    labels = {"2007_000039": [20], "2007_000032": (15, 1), "2008_000001": []}
    text = format_image_labels(labels, comment="made by a test")
    assert text == "# made by a test\n2007_000032 1 15\n2007_000039 20\n2008_000001\n"
    path = tmp_path / "sub" / "labels.txt"
    assert write_image_labels(path, labels, comment="made by a test") is True
    assert path.read_text() == text
    mtime = path.stat().st_mtime_ns
    assert write_image_labels(path, dict(labels), comment="made by a test") is False  # same text: untouched
    assert path.stat().st_mtime_ns == mtime
    assert read_image_labels(path, 21) == {"2007_000032": (1, 15), "2007_000039": (20,), "2008_000001": ()}
    assert write_image_labels(path, {"2007_000032": [1]}) is True
    assert read_image_labels(path, 21) == {"2007_000032": (1,)}
    assert not list(tmp_path.rglob(".*.tmp*"))
    for bad in ({"a b": [1]}, {"#x": [1]}, {"x": [0]}):
        with pytest.raises(ValueError):
            format_image_labels(bad)


@pytest.mark.parametrize("line, words", [
    ("2007_000039 21", ["class 21", "outside 1..20"]),
    ("2007_000039 0", ["class 0", "background 0 is implied"]),
    ("2007_000039 -3", ["class -3", "outside 1..20"]),
    ("2007_000039 x", ["'x'", "not a whole number"]),
    ("2007_000039 1.5", ["'1.5'", "not a whole number"]),
    ("2007_000032 2", ["listed again", "first on line 2", "one line per image"]),
])
def test_read_errors_name_file_and_line(tmp_path, line, words):
    path = tmp_path / "labels.txt"
    path.write_text(f"# comment\n2007_000032 1 15\n\n{line}\n")
    with pytest.raises(UserError) as excinfo:
        read_image_labels(path, 21)
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith(f"{path}:4: ")
    for word in words:
        assert word in msg


def test_read_missing_file(tmp_path):
    with pytest.raises(UserError, match="prepare-data"):
        read_image_labels(tmp_path / "nope.txt", 21)


# ------------------------------------------------------------------------------------------- VOC XML

def _xml(objects: list[tuple[str, int]], parts: tuple[str, ...] = ()) -> str:
    """A VOC annotation with the given (name, difficult) objects; the first one gets `parts`."""
    out = ["<annotation>", "\t<folder>VOC2012</folder>", "\t<filename>x.jpg</filename>",
           "\t<source><database>The VOC2007 Database</database></source>", "\t<segmented>1</segmented>"]
    for n, (name, difficult) in enumerate(objects):
        out += ["\t<object>", f"\t\t<name>{name}</name>", "\t\t<pose>Unspecified</pose>",
                f"\t\t<truncated>{n % 2}</truncated>", f"\t\t<difficult>{difficult}</difficult>",
                "\t\t<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>"]
        for part in parts if n == 0 else ():
            out += ["\t\t<part>", f"\t\t\t<name>{part}</name>",
                    "\t\t\t<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox>", "\t\t</part>"]
        out.append("\t</object>")
    return "\n".join(out + ["</annotation>", ""])


def _original_xml_labels(path: Path) -> list[int]:
    """What SLRNet's make_cls_labels.py did (IRN's load_image_label_from_xml): minidom, every <name> element,
    `firstChild.data` looked up in the class list; then the 20-d vector as class indices."""
    vector = np.zeros(20, np.float32)
    for elem in minidom.parse(str(path)).getElementsByTagName("name"):
        if elem.firstChild.data in ORIGINAL_CAT_LIST:
            vector[ORIGINAL_CAT_LIST.index(elem.firstChild.data)] = 1.0
    return [int(i) + 1 for i in np.flatnonzero(vector)]


def test_voc_xml_names_are_the_originals():
    assert list(voc_xml_names()) == ORIGINAL_CAT_LIST


@pytest.mark.parametrize("objects, parts, expected", [
    ([("aeroplane", 0), ("person", 0), ("person", 0)], ("head", "hand", "foot"), [1, 15]),
    ([("tvmonitor", 1)], (), [20]),                                   # difficult objects count
    ([("diningtable", 0), ("pottedplant", 1), ("dog", 0)], (), [11, 12, 16]),
    ([("person", 0)], ("head",), [15]),
    ([("unicorn", 0), ("dining table", 0)], (), []),                  # not VOC's spelling: no class
    ([], (), []),
])
def test_voc_xml_labels_follow_make_cls_labels(tmp_path, objects, parts, expected):
    path = tmp_path / "a.xml"
    path.write_text(_xml(objects, parts))
    assert voc_xml_labels(path) == expected == _original_xml_labels(path)


def test_voc_xml_unreadable_is_named(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<annotation><object><name>cat</name>")
    with pytest.raises(UserError) as excinfo:
        voc_xml_labels(path)
    assert str(excinfo.value).startswith(f"{path}: not a readable VOC XML annotation") and "\n" not in str(excinfo.value)


# --------------------------------------------------------------------------------- prepare-data voc

def _voc_tree(shared_data: Path, src: Path) -> dict[str, np.ndarray]:
    """A made-up VOC 2012 + SBD download from the real sample pictures; returns id -> the mask given.

    2007_000033: VOC PNG (bicycle + bottle) and an XML that also names a difficult person (XML labels
                 differ from the mask's on purpose: they are separate sources)
    2007_000042: VOC PNG (aeroplane), no XML: the packaged labels say train (19)
    2007_000061: SBD .mat only (horse), image in SBD img/, no XML: packaged labels say boat (4)
    2099_000001: SBD .mat only, background and border only, an id no packaged list knows: no XML line
    2007_000039: an XML without a mask: not listed
    """
    samples = shared_data / "voc_samples"
    voc, sbd = src / "VOCdevkit/VOC2012", src / "benchmark_RELEASE/dataset"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "Annotations", sbd / "img", sbd / "cls"):
        d.mkdir(parents=True)
    border = np.zeros((40, 50), np.uint8)
    border[:2] = 255
    given = {}
    for id_, sample, where in (("2007_000033", 120, "voc"), ("2007_000042", 0, "voc"),
                               ("2007_000061", 8, "sbd"), ("2099_000001", 1, "sbd")):
        image = Image.open(samples / f"{sample}_image.png").convert("RGB")
        mask = np.array(Image.open(samples / f"{sample}_label.png"))
        if id_ == "2099_000001":
            image, mask = image.resize((50, 40)), border
        given[id_] = mask
        if where == "voc":
            image.save(voc / "JPEGImages" / f"{id_}.jpg", quality=90)
            shutil.copy(samples / f"{sample}_label.png", voc / "SegmentationClass" / f"{id_}.png")
        else:
            image.save(sbd / "img" / f"{id_}.jpg", quality=90)
            savemat(sbd / "cls" / f"{id_}.mat", {"GTcls": {"Segmentation": mask, "CategoriesPresent": np.array([1])}})
    (voc / "Annotations" / "2007_000033.xml").write_text(_xml([("bicycle", 0), ("bottle", 1), ("person", 1)], ("head",)))
    (voc / "Annotations" / "2007_000039.xml").write_text(_xml([("tvmonitor", 0)]))
    return given


def _stat(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, path.read_text()


def test_prepare_voc_writes_image_labels_from_masks_and_xml(shared_data, tmp_path):
    given = _voc_tree(shared_data, tmp_path / "src")
    root = tmp_path / "root"
    summary = prepare("voc", tmp_path / "src", root, allow_partial=True)
    assert summary["written"] == 8  # the label files are not counted as samples

    masks = read_image_labels(root / MASK_LABELS, 21)
    assert masks == {"2007_000033": (2, 5), "2007_000042": (1,), "2007_000061": (13,), "2099_000001": ()}
    for id_, mask in given.items():
        written = np.array(Image.open(root / "SegmentationClass" / f"{id_}.png"))
        assert masks[id_] == tuple(labels_from_mask(written, 21)) == tuple(labels_from_mask(mask, 21))
    assert (root / MASK_LABELS).read_text() == ("2007_000033 2 5\n2007_000042 1\n2007_000061 13\n2099_000001\n")

    xml = read_image_labels(root / XML_LABELS, 21)
    packaged = read_image_labels(shipped_labels("voc12_xml"), 21)
    assert xml == {"2007_000033": (2, 5, 15), "2007_000042": packaged["2007_000042"],
                   "2007_000061": packaged["2007_000061"]}
    assert xml["2007_000042"] == (19,) and xml["2007_000061"] == (4,)

    # a second run rewrites nothing; a deleted label file comes back from the masks on disk, identical;
    # a deleted mask is made again and its labels with it
    before = {name: _stat(root / name) for name in (MASK_LABELS, XML_LABELS)}
    second = prepare("voc", tmp_path / "src", root, allow_partial=True)
    assert second["written"] == 0
    assert {name: _stat(root / name) for name in before} == before
    (root / MASK_LABELS).unlink()
    (root / "SegmentationClass" / "2007_000061.png").unlink()
    assert prepare_voc(tmp_path / "src", root) == (1, 7)  # the converter alone (no split-list check: faster)
    assert (root / MASK_LABELS).read_text() == before[MASK_LABELS][1]
    assert _stat(root / XML_LABELS) == before[XML_LABELS]
    assert not list(root.rglob(".*.tmp*"))


def test_prepare_voc_without_annotations_uses_the_packaged_labels(shared_data, tmp_path):
    _voc_tree(shared_data, tmp_path / "src")
    shutil.rmtree(tmp_path / "src/VOCdevkit/VOC2012/Annotations")
    root = tmp_path / "root"
    prepare_voc(tmp_path / "src", root)
    packaged = read_image_labels(shipped_labels("voc12_xml"), 21)
    assert read_image_labels(root / XML_LABELS, 21) == {i: packaged[i] for i in ("2007_000033", "2007_000042", "2007_000061")}


# --------------------------------------------------------------------------------- prepare-data synthetic

def test_prepare_synthetic_writes_image_labels_of_every_image(tmp_path, monkeypatch):
    # prepare-data synthetic runs synthetic.generate (seed 0); a small count keeps it under a second
    for name, value in {"NUM_LABELED": 4, "NUM_UNLABELED": 10, "NUM_VAL": 5, "NUM_TEST": 3}.items():
        monkeypatch.setattr(synthetic, name, value)
    root = tmp_path / "synth"
    prepare("synthetic", None, root, allow_partial=True)
    lines = [ln for ln in (root / MASK_LABELS).read_text().splitlines() if not ln.startswith("#")]
    stems = sorted(p.stem for p in (root / "masks").glob("*.png"))
    assert len(lines) == len(stems) == 22 and [ln.split()[0] for ln in lines] == stems
    labels = read_image_labels(root / MASK_LABELS, len(SYNTHETIC_CLASSES))
    for stem in stems:
        mask = np.array(Image.open(root / "masks" / f"{stem}.png"))
        assert labels[stem] == tuple(labels_from_mask(mask, len(SYNTHETIC_CLASSES)))
        assert labels[stem] == tuple(labels_from_mask(synthetic.render(0, int(stem))[1], len(SYNTHETIC_CLASSES)))
    assert any(len(v) >= 2 for v in labels.values())
    before = _stat(root / MASK_LABELS)
    (root / "images" / "00003.png").unlink()  # one sample redone, the others' labels read back: same file
    assert synthetic.generate(root, seed=0) == (1, 21)
    assert _stat(root / MASK_LABELS) == before
