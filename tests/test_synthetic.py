"""The synthetic shapes dataset: deterministic, complete, idempotent, and colour carries no class."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from semiseg_cli.data import synthetic
from semiseg_cli.data.facts import SYNTHETIC_CLASSES
from semiseg_cli.data.reader import load_image, load_mask
from semiseg_cli.data.splits import read_split, split_path
from semiseg_cli.errors import UserError

SMALL = {"NUM_LABELED": 16, "NUM_UNLABELED": 24, "NUM_VAL": 40, "NUM_TEST": 8, "EXTRA_SPLITS": (4, 64)}
SAMPLE = ["00000.png", "00007.png", "00023.png", "00055.png", "00079.png"]


@pytest.fixture
def small(monkeypatch):
    """Shrink the dataset so that a generation takes well under a second."""
    for name, value in SMALL.items():
        monkeypatch.setattr(synthetic, name, value)


def _gen(root, seed=0):
    t = time.time()
    result = synthetic.generate(root, seed)
    print(f"generate({root.name}, seed={seed}) -> {result} in {time.time() - t:.2f}s")
    return result


def test_default_counts():
    assert (synthetic.NUM_LABELED, synthetic.NUM_UNLABELED, synthetic.NUM_VAL, synthetic.NUM_TEST) == (16, 1000, 200, 200)


def test_layout_counts_and_splits(tmp_path, small):
    root = tmp_path / "synth"
    total = 16 + 24 + 40 + 8
    assert _gen(root) == (total, 0)
    assert len(list((root / "images").glob("*.png"))) == total
    assert len(list((root / "masks").glob("*.png"))) == total
    assert not list(root.rglob("*.tmp"))

    labeled = read_split(split_path("synthetic", "default", "labeled", root))
    unlabeled = read_split(split_path("synthetic", "default", "unlabeled", root))
    val = read_split(split_path("synthetic", "default", "val", root))
    test = read_split(split_path("synthetic", "default", "val", root, eval_split="test"))
    assert (len(labeled), len(unlabeled), len(val), len(test)) == (16, 24, 40, 8)
    assert labeled[0] == ("images/00000.png", "masks/00000.png")
    every = labeled + unlabeled + val + test
    assert len({i for i, _ in every}) == total                       # disjoint, nothing missing
    assert all((root / i).is_file() and (root / m).is_file() for i, m in every)
    assert len(read_split(root / "splits" / "4" / "labeled.txt")) == 4
    assert len(read_split(root / "splits" / "4" / "unlabeled.txt")) == 36
    assert not (root / "splits" / "64").exists()                      # larger than the training set here

    assert (root / "classes.txt").read_text().split() == SYNTHETIC_CLASSES
    readme = (root / "README.txt").read_text()
    assert "semiseg prepare-data synthetic" in readme and "seed 0" in readme

    # every file reads through the toolkit's own loaders: RGB image, 'L' mask of the same size
    seen_val = set()
    for image, mask in every:
        with Image.open(root / mask) as m:
            assert m.mode == "L"
        im = load_image(root / image)
        assert im.size == (128, 128)
        labels = load_mask(root / mask, im.size, len(SYNTHETIC_CLASSES))
        assert labels.max() < len(SYNTHETIC_CLASSES)
        if (image, mask) in val:
            seen_val |= set(np.unique(labels).tolist())
    assert seen_val == set(range(len(SYNTHETIC_CLASSES)))
    seen_labeled = set()
    for _, mask in labeled:
        seen_labeled |= set(np.unique(np.array(Image.open(root / mask))).tolist())
    assert seen_labeled == set(range(len(SYNTHETIC_CLASSES)))          # 16 labeled images show every class


def test_deterministic_across_roots_and_seeds(tmp_path, small):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _gen(a, seed=3)
    _gen(b, seed=3)
    _gen(c, seed=4)
    for name in SAMPLE:
        for sub in ("images", "masks"):
            assert (a / sub / name).read_bytes() == (b / sub / name).read_bytes(), f"{sub}/{name}"
        assert (a / "images" / name).read_bytes() != (c / "images" / name).read_bytes()
        assert (a / "masks" / name).read_bytes() != (c / "masks" / name).read_bytes()
    # a sample does not depend on which others exist or on the order of generation
    img, mask = synthetic.render(3, 55)
    assert np.array_equal(np.array(Image.open(a / "images" / "00055.png")), img)
    assert np.array_equal(np.array(Image.open(a / "masks" / "00055.png")), mask)


def test_idempotent_and_resumes(tmp_path, small):
    root = tmp_path / "synth"
    total = 16 + 24 + 40 + 8
    _gen(root, seed=1)
    before = {n: (root / "images" / n).read_bytes() for n in SAMPLE}
    assert _gen(root, seed=1) == (0, total)
    # a run killed midway: one sample lost its image, another its mask; a rerun rewrites only those
    (root / "images" / "00007.png").unlink()
    (root / "masks" / "00023.png").unlink()
    assert _gen(root, seed=1) == (2, total - 2)
    assert {n: (root / "images" / n).read_bytes() for n in SAMPLE} == before


def test_other_seed_into_same_root_is_refused(tmp_path, small):
    root = tmp_path / "synth"
    _gen(root, seed=0)
    with pytest.raises(UserError) as e:
        synthetic.generate(root, seed=1)
    assert "\n" not in str(e.value) and "seed 0" in str(e.value)
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "x.png").write_bytes(b"")
    with pytest.raises(UserError):
        synthetic.generate(foreign, seed=0)


def test_colour_does_not_give_the_class_away():
    """Per-object mean colours: a nearest-class-mean classifier is near chance (1/5) on held-out images."""
    feats, labels, groups = [], [], []
    for i in range(200):
        img, mask = synthetic.render(0, i)
        for c in range(1, len(SYNTHETIC_CLASSES)):
            sel = mask == c
            if sel.sum() >= 20:
                feats.append(img[sel].mean(0))
                labels.append(c)
                groups.append(i)
    feats, labels, groups = np.array(feats), np.array(labels), np.array(groups)
    train, test = groups % 2 == 0, groups % 2 == 1
    classes = np.unique(labels)
    assert len(classes) == 5 and len(labels) > 500
    means = np.stack([feats[train & (labels == c)].mean(0) for c in classes])
    pred = classes[np.argmin(((feats[test][:, None] - means[None]) ** 2).sum(-1), 1)]
    accuracy = (pred == labels[test]).mean()
    print(f"nearest-mean colour classifier accuracy {accuracy:.3f} (chance 0.2)")
    assert accuracy < 0.33
    # the class means (all images) differ by no more than sampling noise, and little next to the spread
    all_means = np.stack([feats[labels == c].mean(0) for c in classes])
    stderr = np.stack([feats[labels == c].std(0) / np.sqrt((labels == c).sum()) for c in classes])
    spread = np.mean([feats[labels == c].std(0).mean() for c in classes])
    deviation = np.abs(all_means - all_means.mean(0))
    print(f"class-mean deviation max {deviation.max():.1f} (within-class spread {spread:.1f})")
    assert (deviation / stderr).max() < 4.5
    assert deviation.max() < 0.3 * spread
