"""Synthetic captions for SimSeg: what they say about a hand-made mask, and `prepare-data synthetic --captions`."""
from __future__ import annotations

import csv
import json

import numpy as np

from semiseg_cli.data.captions import caption, objects, place
from semiseg_cli.data.facts import SYNTHETIC_CLASSES
from tests.conftest import run_cli

DISC, SQUARE, CROSS = (SYNTHETIC_CLASSES.index(n) for n in ("disc", "square", "cross"))


def test_a_caption_names_counts_and_places_the_visible_objects():
    mask = np.zeros((120, 120), np.uint8)
    mask[50:70, 5:25] = DISC           # left
    mask[50:70, 95:115] = DISC         # right
    mask[5:25, 50:70] = CROSS          # top
    mask[100:103, 100:103] = SQUARE    # 9 pixels: too small to be mentioned
    assert [o[0] for o in objects(mask)] == [DISC, DISC, CROSS]
    text = caption(mask, np.random.default_rng(0))
    assert text.endswith(".") and "square" not in text
    assert "two discs on the left and on the right" in text and "a cross at the top" in text
    assert place(10, 110, 120) == "at the bottom left" and place(60, 60, 120) == "in the middle"
    assert caption(np.zeros((8, 8), np.uint8), np.random.default_rng(0)).endswith("an empty background.")


def test_prepare_data_synthetic_with_captions(synthetic_root, tmp_path):
    import shutil

    from semiseg_cli.engine.retrieval import read_pairs
    from semiseg_cli.models.prompts import templates
    from semiseg_cli.data.text import Tokenizer

    # a copy of the session's synthetic root (images and masks linked), so its file set stays as generated
    root = tmp_path / "synthetic"
    root.mkdir()
    for p in synthetic_root.iterdir():
        if p.name in ("images", "masks"):
            (root / p.name).symlink_to(p)
        elif p.is_dir():
            shutil.copytree(p, root / p.name)
        else:
            shutil.copy(p, root / p.name)
    synthetic_root = root

    out = json.loads(run_cli("prepare-data", "synthetic", "--root", synthetic_root, "--captions", check=0).stdout)
    assert out["captions"]["train"] == 1016 and out["captions"]["val"] == 200 and out["captions"]["parquet"]
    cap = synthetic_root / "captions"
    rows = list(csv.DictReader((cap / "train_anno.csv").open()))
    assert len(rows) == 1016 and rows[0]["image"] == "images/00000.png" and rows[0]["caption"]
    # each caption mentions exactly the classes with a mentionable region in the image's mask
    from PIL import Image

    for r in rows[:50]:
        mask = np.array(Image.open(synthetic_root / r["image"].replace("images/", "masks/")))
        named = {c for c in range(1, len(SYNTHETIC_CLASSES)) if SYNTHETIC_CLASSES[c] in r["caption"]}
        assert named == {o[0] for o in objects(mask)}, r
    # the vocabulary covers every caption and zero-shot prompt: no [UNK]
    tok = Tokenizer((cap / "vocab.txt").read_bytes(), 64)
    texts = [r["caption"] for r in rows] + [t.format(n) for t in templates("imagenet80") for n in SYNTHETIC_CLASSES]
    ids, _ = tok(texts)
    assert not (ids == tok.vocab["[UNK]"]).any()
    # the same training pairs as webdataset tar shards
    from semiseg_cli.data.pairs import TarPairs

    assert out["captions"]["shards"] == 4 and len(list((cap / "shards").glob("train-*.tar"))) == 4
    shards = TarPairs(cap / "shards", "caption")
    assert len(shards) == 1016 and [shards.get(i)[1] for i in (0, 500, 1015)] == [rows[i]["caption"] for i in (0, 500, 1015)]
    pairs = read_pairs(cap / "valid.parquet")
    assert len(pairs["images"]) == 200 and len(pairs["captions"]) == 200
    # a second run writes the same files; --captions is synthetic's only
    before = (cap / "train_anno.csv").read_bytes()
    run_cli("prepare-data", "synthetic", "--root", synthetic_root, "--captions", check=0)
    assert (cap / "train_anno.csv").read_bytes() == before
    bad = run_cli("prepare-data", "camvid", "--src", tmp_path, "--root", tmp_path / "c", "--captions", check=2)
    assert "--captions applies to prepare-data synthetic only" in bad.stderr
