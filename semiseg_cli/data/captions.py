"""Captions for the synthetic shapes (`prepare-data synthetic --captions`): image-caption pairs for SimSeg's
text-supervised training on a CPU, generated from each scene's visible objects. They are idealised captions:
every visible object is named (by its class), counted and placed, nothing else is said, so they are far
cleaner than web alt-text; the masks themselves are never part of the training data.

An object is a connected region of one class in the mask with at least `MIN_AREA` pixels (an object mostly
hidden by another one is not mentioned; two touching objects of one class count as one). Its place is the image third its centroid falls in ("at the top
left", "in the middle", ...). Per image, one caption in a template drawn from the image's own generator
(`default_rng([seed, CAPTION_STREAM + index])`), e.g. "a photo of two discs on the left and a ring at the
bottom."

Layout under `<root>/captions/`:
    train_anno.csv   ZeroVL's layout: `image,caption` (image relative to the root), one row per training image
    val_anno.csv     the validation images, the same columns plus `image_id` and `caption_id`
    valid.parquet    the validation pairs in SimSeg's retrieval layout (with pyarrow: `eval --retrieval`)
    shards/train-00000.tar ...  the training pairs as webdataset tar shards (`<id>.png`, `<id>.txt`), SHARDS of them
    vocab.txt        a BERT WordPiece vocabulary of every word the captions and the zero-shot prompts use
"""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np

from semiseg_cli.data.facts import SYNTHETIC_CLASSES
from semiseg_cli.io import write_text_atomic

CAPTION_STREAM = 2_000_000
MIN_AREA = 40
NUMBERS = ["no", "one", "two", "three", "four", "five", "six"]
PLURAL = {"cross": "crosses"}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
OPENINGS = ("a photo of", "a picture of", "an image with", "there are", "this shows")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHARDS = 4


def objects(mask: np.ndarray) -> list[tuple[int, float, float]]:
    """(class, centroid x, centroid y) of each connected region of >= MIN_AREA pixels of a non-background
    class, in class order then left to right."""
    out = []
    for c in range(1, len(SYNTHETIC_CLASSES)):
        n, _, stats, centroids = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        out += [(c, float(centroids[i][0]), float(centroids[i][1])) for i in range(1, n)
                if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA]
    return sorted(out, key=lambda o: (o[0], o[1]))


def place(x: float, y: float, size: int) -> str:
    row, col = ROWS[min(int(3 * y / size), 2)], COLS[min(int(3 * x / size), 2)]
    if (row, col) == ("middle", "centre"):
        return "in the middle"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"at the {row} {col}"


def noun(c: int, count: int) -> str:
    name = SYNTHETIC_CLASSES[c]
    return name if count == 1 else PLURAL.get(name, name + "s")


def caption(mask: np.ndarray, rng: np.random.Generator) -> str:
    """One caption naming, counting and placing the mask's visible objects (see the module docstring)."""
    found = objects(mask)
    if not found:
        return f"{OPENINGS[int(rng.integers(len(OPENINGS)))]} an empty background."
    parts = []
    for c in sorted({o[0] for o in found}):
        mine = [o for o in found if o[0] == c]
        where = sorted({place(x, y, mask.shape[0]) for _, x, y in mine})
        count = NUMBERS[len(mine)] if len(mine) < len(NUMBERS) else "many"
        count = ("a" if SYNTHETIC_CLASSES[c][0] not in "aeiou" else "an") if len(mine) == 1 else count
        parts.append(f"{count} {noun(c, len(mine))} {' and '.join(where)}")
    order = rng.permutation(len(parts))
    parts = [parts[i] for i in order]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{OPENINGS[int(rng.integers(len(OPENINGS)))]} {body}."


def words_of(texts) -> set[str]:
    """The lower-cased words and punctuation of `texts`, as BERT's basic tokeniser splits them."""
    out = set()
    for t in texts:
        for w in t.lower().replace("'", " ' ").replace(".", " . ").replace(",", " , ").replace("-", " - ").split():
            out.add(w)
    return out


def vocabulary(captions, prompts) -> list[str]:
    """BERT's special tokens, then every word of the captions, the class names and the prompts, sorted."""
    words = words_of(captions) | words_of(prompts) | words_of(SYNTHETIC_CLASSES)
    words |= {noun(c, 2) for c in range(1, len(SYNTHETIC_CLASSES))}
    return SPECIAL + sorted(words - set(SPECIAL))


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_shards(root: Path, rows: list[dict], folder: Path, shards: int = SHARDS) -> list[Path]:
    """`rows` as webdataset tar shards `train-00000.tar` ... (`<id>.png` + `<id>.txt` per pair, rows split in
    contiguous runs), each written atomically."""
    from semiseg_cli.io import temp_path

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    paths = []
    for k in range(shards):
        path = folder / f"train-{k:05d}.tar"
        tmp = temp_path(path)
        with tarfile.open(tmp, "w") as tar:
            for r in rows[k * per:(k + 1) * per]:
                stem = Path(r["image"]).stem
                for name, data in ((f"{stem}.png", (root / r["image"]).read_bytes()), (f"{stem}.txt", r["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
        paths.append(path)
    return paths


def write_captions(root: Path, prompts: list[str], seed: int = 0) -> dict:
    """Write `<root>/captions/` (module docstring) for a prepared synthetic root: its training images
    (splits/default labeled + unlabeled) and validation images (splits/val.txt), captioned from their masks.
    With pyarrow installed (`semiseg[simseg]`) also `valid.parquet`, SimSeg's retrieval layout (`imbytes`,
    `caption`, `image_id`, `id`) of the validation images. `prompts`: the zero-shot prompt texts the vocabulary
    must also cover (the caller's: models/prompts.py sits above this module). Returns {"train", "val", "vocab",
    "parquet", "shards"}."""
    from PIL import Image

    from semiseg_cli.data.splits import read_split

    splits = root / "splits"
    lists = {"train": read_split(splits / "default" / "labeled.txt") + read_split(splits / "default" / "unlabeled.txt"),
             "val": read_split(splits / "val.txt")}
    rows = {}
    for split, items in lists.items():
        rows[split] = []
        for image, mask in items:
            index = int(Path(image).stem)
            text = caption(np.array(Image.open(root / mask)), np.random.default_rng([seed, CAPTION_STREAM + index]))
            rows[split].append({"image": image, "caption": text, "image_id": index, "caption_id": index})
    out = root / "captions"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "train_anno.csv", csv_text(rows["train"], ["image", "caption"]))
    write_text_atomic(out / "val_anno.csv", csv_text(rows["val"], ["image", "caption", "image_id", "caption_id"]))
    write_shards(root, rows["train"], out / "shards")
    vocab = vocabulary([r["caption"] for split in rows.values() for r in split], prompts)
    write_text_atomic(out / "vocab.txt", "\n".join(vocab) + "\n")
    parquet = False
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        from semiseg_cli.io import temp_path

        table = pa.Table.from_pylist([{"imbytes": (root / r["image"]).read_bytes(), "caption": r["caption"],
                                       "image_id": r["image_id"], "id": r["caption_id"]} for r in rows["val"]])
        tmp = temp_path(out / "valid.parquet")
        pq.write_table(table, tmp)
        tmp.replace(out / "valid.parquet")
        parquet = True
    return {"train": len(rows["train"]), "val": len(rows["val"]), "vocab": len(vocab), "parquet": parquet,
            "shards": SHARDS}
