"""Image-caption pairs for text-supervised training (SimSeg, `method: simseg`; specs/simseg.md §1.5), read from
the three layouts image-text corpora come in, chosen by `captions.path`:

    *.csv / *.tsv   ZeroVL's `train_anno.csv`: a header row with `image` (a path under captions.images, itself
                    relative to the file's folder) and `caption` columns (other names: captions.image_column / caption_column)
    *.parquet       rows with the encoded image bytes and the caption (`imbytes`, `caption`: SimSeg's layout)
    *.tar           webdataset shards: members `<key>.<jpg|jpeg|png|webp>` and `<key>.txt` (or `<key>.json`
                    with the caption column); one file, a folder of shards or a glob such as `cc3m/*.tar`

Tar shards are read by random access: each shard's member offsets are indexed once (stdlib `tarfile`
headers, nothing decoded), so the trainer's exact-resume sampler works as on any list. Under torchrun each
process reads its own shards (shard i by process i mod world): its dataset holds those, every process's epoch is
the smallest share (so they step together), and a process whose share is larger reads it through the sampler's
seeded passes (data/streams.py `stream_index`).

A sample: RandomResizedCrop (area captions.crop_scale, bicubic) to train.crop_size, then AutoAugment's
ImageNet policy, both from the sample's own RNG; the caption augmented (`text.augment_caption`) and tokenised to
simseg.max_length. Tensors (streams.py): c (uint8 image), c_ids, c_mask (token ids, attention mask).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import random
import tarfile
from pathlib import Path

from torch.utils.data import Dataset

from semiseg_cli.data import transforms as T
from semiseg_cli.data.reader import load_image
from semiseg_cli.data.text import Tokenizer, augment_caption, read_vocab
from semiseg_cli.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def open_parquet(path: str | Path, columns: tuple[str, ...], hint: str = "set captions.image_column / "
                 "captions.caption_column"):
    """The pyarrow table of a parquet file, memory-mapped, checked for `columns` (one UserError per problem;
    `hint` says what to do about a missing column)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: parquet files are read with pyarrow: pip install 'semiseg[simseg]'") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (it has {', '.join(table.column_names)}); {hint}")
    return table


class CsvPairs:
    """(image path, caption) rows of a CSV / TSV with a header."""

    def __init__(self, path: Path, images: Path, image_column: str, caption_column: str):
        self.path, self.images = path, images
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
                if missing:
                    raise UserError(f"{path}: no column {', '.join(missing)} in its header ({reader.fieldnames}); set "
                                    "captions.image_column / captions.caption_column")
                self.rows = [(r[image_column], r[caption_column]) for r in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{path}: cannot read the caption file ({e})") from None

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int):
        image, caption = self.rows[i]
        return load_image(self.images / image), caption


class ParquetPairs:
    """(encoded image, caption) rows of a parquet file."""

    def __init__(self, path: Path, image_column: str, caption_column: str):
        self.path, self.columns = path, (image_column, caption_column)
        self.table = open_parquet(path, self.columns)

    def __len__(self) -> int:
        return self.table.num_rows

    def get(self, i: int):
        blob, caption = (self.table.column(c)[i].as_py() for c in self.columns)
        return load_image(io.BytesIO(blob), f"{self.path} row {i}"), str(caption)


def index_shard(path: Path, caption_column: str) -> list[tuple]:
    """[(key, (image offset, size), (caption offset, size), caption kind)] of the complete samples of a
    webdataset tar shard, from its headers (nothing is decoded)."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if dot:
                    groups.setdefault(f"{folder}/{stem}", {})[ext.lower()] = (m.offset_data, m.size)
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"{path}: not a readable tar shard ({e}); webdataset shards are uncompressed .tar files") from None
    out = []
    for key, members in groups.items():
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        text = ("txt", members["txt"]) if "txt" in members else ("json", members["json"]) if "json" in members else None
        if image is not None and text is not None:
            out.append((key, image, text[1], text[0]))
    if not out:
        raise UserError(f"{path}: no sample with an image (.{'/.'.join(IMAGE_EXTS)}) and a caption (.txt or .json)")
    return out


def shard_paths(spec: Path) -> list[Path]:
    if spec.is_dir():
        paths = sorted(spec.glob("*.tar"))
    elif any(ch in str(spec) for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(str(spec)))
    else:
        paths = [spec] if spec.is_file() else []
    if not paths:
        raise UserError(f"{spec}: no .tar shard found (captions.path: a .tar file, a folder of them or a glob)")
    return paths


class TarPairs:
    """(image, caption) samples of webdataset tar shards, read by offset; `rank` / `world`: this process's shards
    (shard i by process i mod world) and `epoch_share`, the smallest process's sample count."""

    def __init__(self, spec: Path, caption_column: str, rank: int = 0, world: int = 1):
        shards = shard_paths(spec)
        if len(shards) < world:
            raise UserError(f"{spec}: {len(shards)} tar shard(s) for {world} processes; each process reads its own "
                            f"shards: split the data into at least {world} shards")
        self.caption_column = caption_column
        # every shard is indexed (headers only) so that each process knows the smallest share
        index = [index_shard(p, caption_column) for p in shards]
        shares = [sum(len(index[i]) for i in range(r, len(shards), world)) for r in range(world)]
        self.epoch_share = min(shares)
        self.samples = [(shards[i], s) for i in range(rank, len(shards), world) for s in index[i]]

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int):
        shard, (key, (io_, isz), (co, csz), kind) = self.samples[i]
        with open(shard, "rb") as f:
            f.seek(io_)
            blob = f.read(isz)
            f.seek(co)
            text = f.read(csz).decode("utf-8", errors="replace")
        if kind == "json":
            try:
                text = json.loads(text)[self.caption_column]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{shard}: {key}.json has no {self.caption_column!r} field (captions.caption_column)") from None
        return load_image(io.BytesIO(blob), f"{shard}:{key}"), str(text).strip()


class CaptionDataset(Dataset):
    """Training samples (c, c_ids, c_mask) of image-caption pairs (see the module docstring).

    A key from the trainer's sampler is (epoch, position, index) or (epoch, position); the augmentation is seeded
    by (seed, epoch, position) as SegDataset's. `per_process`: the pairs are this process's share (tar shards
    under torchrun); len() is then the epoch over all processes (world x the smallest share) and `local` the
    pairs held here."""

    def __init__(self, source, tokenizer: Tokenizer, crop_size: int, crop_scale=(0.6, 1.0), autoaugment: bool = True,
                 augment_p: float = 0.2, seed: int = 0, world: int = 1):
        self.source, self.tokenizer = source, tokenizer
        self.crop_size, self.crop_scale, self.autoaugment = crop_size, tuple(crop_scale), autoaugment
        self.augment_p, self.seed = augment_p, seed
        self.per_process = isinstance(source, TarPairs) and world > 1
        self.local = len(source)
        self.epoch_len = source.epoch_share * world if self.per_process else len(source)

    def __len__(self) -> int:
        return self.epoch_len

    def load(self, i: int):
        """The image and caption of pair i (checked: `train --dry-run` reads a few)."""
        return self.source.get(i)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, position, *index = key
            index = index[0] if index else position % self.local
        else:
            epoch, position, index = 0, key, key
        img, caption = self.source.get(index)
        rng = random.Random(f"{self.seed}-{epoch}-{position}")
        img = T.random_resized_crop(img, None, self.crop_size, rng, self.crop_scale)
        if self.autoaugment:
            img = T.autoaugment(img, rng)
        ids, mask = self.tokenizer([augment_caption(caption, self.tokenizer, rng, self.augment_p)])
        return T.to_uint8_tensor(img), ids[0], mask[0]


def build_pairs(cfg: dict, rank: int = 0, world: int = 1):
    """The pair source `captions.path` names (CSV / TSV image paths under captions.images, relative to the file's
    folder)."""
    c = cfg["captions"]
    if not c["path"]:
        raise UserError("method simseg trains on image-caption pairs: set captions.path (a CSV / TSV, a .parquet or "
                        "webdataset .tar shards; e.g. `prepare-data synthetic --captions` writes captions/train_anno.csv)")
    path = Path(c["path"]).expanduser()
    kind = path.suffix.lower()
    if kind in (".csv", ".tsv"):
        if not path.is_file():
            raise UserError(f"{path}: caption file not found (captions.path)")
        return CsvPairs(path, path.parent / c["images"], c["image_column"] or "image", c["caption_column"])
    if kind == ".parquet":
        return ParquetPairs(path, c["image_column"] or "imbytes", c["caption_column"])
    if kind == ".tar" or path.is_dir() or any(ch in c["path"] for ch in "*?["):
        return TarPairs(path, c["caption_column"], rank, world)
    raise UserError(f"captions.path {c['path']!r}: not a .csv / .tsv / .parquet file or .tar shards")


def build_caption_dataset(cfg: dict, seed_offset: int = 0) -> CaptionDataset:
    """The `captions` stream's dataset of a resolved config (this process's share under torchrun)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    s, c = cfg["simseg"], cfg["captions"]
    pairs = build_pairs(cfg, rank, world)
    if not s["vocab"]:
        raise UserError("method simseg tokenises the captions with the BERT vocabulary: set simseg.vocab (a vocab.txt "
                        "or the bert-base-uncased tokenizer folder)")
    tok = Tokenizer(read_vocab(s["vocab"]), s["max_length"])
    return CaptionDataset(pairs, tok, cfg["train"]["crop_size"], c["crop_scale"],
                          c["autoaugment"], c["augment_p"], cfg["train"]["seed"] + seed_offset, world)

