"""Image-level labels (the classes an image shows, no locations), for weakly supervised methods (SLRNet).

File format (text, one line per image, sorted by id; `#` lines are comments, blank lines are skipped):

    <image id> <class> <class> ...

The classes are indices in the dataset's label space (VOC: 1..20), sorted; background 0 is never listed, it
is implied; an image with no foreground class has just its id. Example: `2007_000032 1 15`.

Two sources, as in SLRNet (specs/slrnet_s4mc.md A2.1, A5):
    * from the masks (`labels_from_mask`): what SLRNet trains with; `prepare-data` writes
      `<root>/image_labels.txt` for VOC and the synthetic data.
    * from VOC's XML annotations (`voc_xml_labels`): what SLRNet's inference multiplies the masks with
      (`--use_cls_label 1`, its `voc12/cls_labels.npy`); `prepare-data voc` writes
      `<root>/image_labels_xml.txt`. The packaged `image_labels/voc12_xml.txt` (`shipped_labels("voc12_xml")`)
      is that .npy converted once to this format (12,031 ids = train_aug + val); the pickle is never read
      at run time.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import numpy as np

from semiseg_cli.data.facts import IGNORE_INDEX, class_names
from semiseg_cli.errors import UserError, did_you_mean
from semiseg_cli.io import write_text_atomic

MASK_LABELS = "image_labels.txt"       # <root>/image_labels.txt: from the masks (training)
XML_LABELS = "image_labels_xml.txt"    # <root>/image_labels_xml.txt: from VOC's XML annotations (inference)
SHIPPED_DIR = Path(__file__).resolve().parent / "image_labels"
SHIPPED = {"voc12_xml": "voc12_xml.txt"}


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    """The foreground classes present in an index mask, sorted: values 1..num_classes-1 (background 0 and the
    ignore value 255 are left out). Any other value is a ValueError (the mask readers reject those first)."""
    mask = np.asarray(mask)
    if mask.dtype == np.uint8:  # bincount over 256 bins: a few times faster than np.unique
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        present = np.unique(mask)
    bad = [int(v) for v in present if (v < 0 or v >= num_classes) and v != IGNORE_INDEX]
    if bad:
        raise ValueError(f"mask values {bad[:5]} outside 0..{num_classes - 1} (and not {IGNORE_INDEX})")
    return [int(v) for v in present if 0 < v < num_classes]


def format_image_labels(labels: dict, comment: str | list[str] = ()) -> str:
    """The file text of `labels` (id -> classes): comment lines first, then one line per id, sorted by id."""
    comments = [comment] if isinstance(comment, str) else list(comment)
    lines = [f"# {c}".rstrip() for c in comments]
    for id_ in sorted(labels):
        if not isinstance(id_, str) or not id_ or id_.startswith("#") or any(ch.isspace() for ch in id_):
            raise ValueError(f"image id {id_!r}: must be a non-empty string without spaces, not starting with '#'")
        classes = sorted({int(c) for c in labels[id_]})
        if classes and classes[0] < 1:
            raise ValueError(f"image {id_}: class {classes[0]} listed; classes are >= 1 (background 0 is implied)")
        lines.append(" ".join([id_, *map(str, classes)]))
    return "".join(f"{line}\n" for line in lines)


def write_image_labels(path: str | Path, labels: dict, comment: str | list[str] = ()) -> bool:
    """Write `labels` (image id -> classes) to `path` in the format above, atomically (io.write_text_atomic).
    A file that already holds exactly this text is left untouched (same mtime); returns True when written.
    `comment`: line(s) written first as `# ...`."""
    path = Path(path)
    text = format_image_labels(labels, comment)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass  # unreadable: replace it
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return True


def read_image_labels(path: str | Path, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Read an image-labels file: {image id: sorted classes}. Every problem (a missing file, a non-integer, a
    class outside 1..num_classes-1, an id listed twice) is a UserError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: image-labels file not found; `semiseg prepare-data` writes {MASK_LABELS} "
                        f"(and {XML_LABELS} for voc) into the dataset root") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UserError(f"{path}: cannot read the image-labels file ({why}); delete it and run "
                        "`semiseg prepare-data` again") from None
    out: dict[str, tuple[int, ...]] = {}
    first_line: dict[str, int] = {}
    fix = "lines are '<image id> <class> ...' with class indices 1.."
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        where, id_ = f"{path}:{n}", parts[0]
        if id_ in first_line:
            raise UserError(f"{where}: image {id_!r} is listed again (first on line {first_line[id_]}); "
                            "keep one line per image")
        classes = set()
        for token in parts[1:]:
            try:
                c = int(token)
            except ValueError:
                raise UserError(f"{where}: class {token!r} of image {id_!r} is not a whole number; "
                                f"{fix}{num_classes - 1}") from None
            if not 1 <= c < num_classes:
                raise UserError(f"{where}: class {c} of image {id_!r} is outside 1..{num_classes - 1} "
                                f"(background 0 is implied, never listed); {fix}{num_classes - 1}")
            classes.add(c)
        first_line[id_] = n
        out[id_] = tuple(sorted(classes))
    return out


@lru_cache(maxsize=None)
def voc_xml_names() -> tuple[str, ...]:
    """The 20 VOC class names as VOC's XML annotations spell them ('diningtable', 'pottedplant',
    'tvmonitor'), in index order 1..20: the project's VOC class list without spaces and slashes."""
    return tuple(name.replace(" ", "").replace("/", "") for name in class_names("voc")[1:])


def voc_xml_labels(xml_path: str | Path) -> list[int]:
    """The VOC classes (1..20, sorted) named in a VOC XML annotation, exactly as SLRNet's
    voc12/make_cls_labels.py made cls_labels.npy (IRN's `load_image_label_from_xml`): every `<name>` element
    of the file whose text is one of the 20 class names counts; other names (the `<part>` names head, hand,
    foot) are ignored; `difficult` and `truncated` objects are NOT skipped. The original reads minidom's
    `firstChild.data` (the text before any child, unstripped): ElementTree's `.text` is the same string and
    parses ~10x faster (12k files per `prepare-data voc` run)."""
    path = Path(xml_path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError, ValueError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{path}: not a readable VOC XML annotation ({why}); replace it with the file from the "
                        "original download") from None
    index = {name: i + 1 for i, name in enumerate(voc_xml_names())}
    return sorted({index[elem.text] for elem in tree.iter("name") if elem.text in index})


def shipped_labels(name: str) -> Path:
    """Path of a packaged image-labels file: "voc12_xml" = SLRNet's cls_labels.npy (VOC XML labels of
    train_aug + val, 12,031 ids) in the text format."""
    if name not in SHIPPED:
        raise UserError(f"no packaged image labels {name!r}{did_you_mean(name, SHIPPED)}; "
                        f"choose one of: {', '.join(SHIPPED)}")
    path = SHIPPED_DIR / SHIPPED[name]
    if not path.is_file():
        raise UserError(f"{path}: missing; semiseg is installed without its image_labels/ data, reinstall it")
    return path
