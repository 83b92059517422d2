"""The embedded synthetic dataset: shapes on clutter, made offline by `semiseg prepare-data synthetic`.

It is the toolkit's default dataset for the demo and the CPU tests, so it has to be small, fast to make
(1416 128x128 images in about 25 s on two CPU cores, drawn with vectorised numpy/cv2), and meant to be a
problem on which semi-supervised learning can show a gain over training on the labeled images alone.
With the shipped 3,000-iteration recipes UniMatch gains 5.5 mIoU over supervised training (3 seeds,
README "The demo"); at 600 iterations neither UniMatch nor FixMatch has caught up yet.

Design:
    * Classes are shapes (`SYNTHETIC_CLASSES`: background, disc, square, triangle, cross, ring). Shape is a
      property a CNN has to learn from spatial context (corners, straight edges, a hole, arms), so the task
      needs examples; colour and texture would be learned from one.
    * Colour and texture carry no class information: every object, every clutter stroke and the background
      draw their colours from the same distribution (uniform RGB), and the fill styles (flat, shaded,
      striped, blotched, outlined) are chosen independently of the class. A pixel's colour says nothing
      about its class, only its neighbourhood's shape does.
    * Nuisance: objects vary in size (radius 12..28 px), aspect ratio, rotation and position; 2..5 of them per
      image overlap (the mask shows the top one, and a ring's hole shows what is behind it); the background
      is smooth coloured noise with gradients and textures, plus clutter that is NOT an object (thin
      strokes, open arcs, irregular blobs, dots) and is labeled background; per-image brightness, contrast,
      blur and pixel noise vary. Together these keep a dozen labeled images from saturating the task while
      the shapes stay unambiguous, so pseudo-labels on unlabeled images are worth learning from.
    * Counts (defaults): 16 labeled + 1000 unlabeled training images, 200 validation images and 200
      held-out test images (the demo's table; settings were chosen on val only). Alternative
      splits `splits/<k>/` (k = 4, 64) hold the first k training images as labeled, the rest unlabeled.
    * How methods fare on it at several budgets is measured in README.md (Benchmarks).

Layout under `root`:
    images/<NNNNN>.png   RGB
    masks/<NNNNN>.png    single-channel ('L') class indices 0..5
    splits/default/{labeled,unlabeled}.txt, splits/<k>/{labeled,unlabeled}.txt, splits/val.txt,
    splits/test.txt (held out: `--set dataset.eval_split=test`)
    image_labels.txt     the classes each mask shows, one `<NNNNN> <class> ...` line per image, all of them
                         (data/image_labels.py; for weakly supervised methods)
    classes.txt, README.txt, .synthetic  (the generator version and seed that own this root)

Determinism: sample i is drawn from its own `np.random.default_rng([seed, i])`, so its bytes do not depend
on the order of generation or on which files already exist. Files are written to a temporary name and
renamed, so a killed run leaves no half-written file, and a second run skips the complete samples.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from semiseg_cli.console import progress
from semiseg_cli.data.facts import SYNTHETIC_CLASSES
from semiseg_cli.data.image_labels import MASK_LABELS, labels_from_mask, write_image_labels
from semiseg_cli.data.splits import write_split
from semiseg_cli.errors import UserError
from semiseg_cli.io import save_index_png, write_atomic

VERSION = 1
SIZE = 128
NUM_LABELED = 16
NUM_UNLABELED = 1000
NUM_VAL = 200
NUM_TEST = 200                   # held out: never evaluated during training nor used to choose settings
EXTRA_SPLITS = (4, 64)          # splits/<k>/: the first k training images labeled, the rest unlabeled
MARKER = ".synthetic"

_SHIFT = 4                       # cv2 sub-pixel bits for anti-aliased drawing
_ONE = 1 << _SHIFT


# ----------------------------------------------------------------------------------------------- shapes

def _unit_shape(cls: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Outline(s) of class `cls` in unit coordinates: [outer] or [outer, hole]; roughly radius 1."""
    name = SYNTHETIC_CLASSES[cls]
    if name in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], 1)
        if name == "disc":
            return [circle]
        return [circle, circle * rng.uniform(0.4, 0.65)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.88]
    if name == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [np.stack([np.cos(a), np.sin(a)], 1) * 1.3]
    if name == "cross":
        w = rng.uniform(0.28, 0.42)
        return [np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                          [-w, w], [-1, w], [-1, -w], [-w, -w]], float)]
    raise ValueError(cls)


def _place(points: np.ndarray, center, radius: float, aspect: float, angle: float) -> np.ndarray:
    """Scale (with aspect), rotate and translate unit points; int32 cv2 points with _SHIFT sub-pixel bits."""
    p = points * np.array([radius * aspect, radius / aspect])
    c, s = np.cos(angle), np.sin(angle)
    p = p @ np.array([[c, s], [-s, c]]) + np.asarray(center, float)
    return np.round(p * _ONE).astype(np.int32)


def _alpha(outlines: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the first outline minus the others (holes), float32 [H, W]."""
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(canvas, [outlines[0]], 255, cv2.LINE_AA, _SHIFT)
    for hole in outlines[1:]:
        cv2.fillPoly(canvas, [hole], 0, cv2.LINE_AA, _SHIFT)
    return canvas.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------------------- appearance

def _colour(rng: np.random.Generator) -> np.ndarray:
    """The one colour distribution shared by every class, the clutter and the background."""
    return rng.uniform(0, 255, 3).astype(np.float32)


def _smooth(rng: np.random.Generator, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth noise in [0, 1]: a cells x cells random grid upsampled bicubically, [H, W] or [H, W, C]."""
    grid = rng.random((cells, cells, channels)).astype(np.float32)
    up = cv2.resize(grid, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    up = up.reshape(SIZE, SIZE, channels)
    lo, hi = up.min(), up.max()
    up = (up - lo) / max(hi - lo, 1e-6)
    return up[..., 0] if channels == 1 else up


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _ramp(rng: np.random.Generator) -> np.ndarray:
    """A linear gradient in [0, 1] across the image at a random angle."""
    a = rng.uniform(0, 2 * np.pi)
    r = np.cos(a) * _XX + np.sin(a) * _YY
    return (r - r.min()) / (r.max() - r.min())


def _stripes(rng: np.random.Generator) -> np.ndarray:
    """A soft stripe (or checker) pattern in [0, 1]."""
    a = rng.uniform(0, np.pi)
    period = rng.uniform(4, 11)
    u = np.cos(a) * _XX + np.sin(a) * _YY
    pat = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.3:
        v = -np.sin(a) * _XX + np.cos(a) * _YY
        pat = pat * (0.5 + 0.5 * np.sin(2 * np.pi * v / period))
    return pat


def _fill(rng: np.random.Generator) -> np.ndarray:
    """An [H, W, 3] float32 fill (flat, shaded, striped or blotched), chosen independently of the class."""
    a = _colour(rng)
    kind = rng.choice(4, p=[0.55, 0.25, 0.1, 0.1])
    if kind == 0:
        return np.broadcast_to(a, (SIZE, SIZE, 3)).copy()
    b = _colour(rng) if kind >= 2 else a * rng.uniform(0.3, 0.7)
    t = _ramp(rng) if kind == 1 else _stripes(rng) if kind == 2 else _smooth(rng, int(rng.integers(10, 24)))
    return a + (b - a) * t[..., None]


def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth coloured noise + gradient + optional faint texture, [H, W, 3] float32."""
    c0, c1 = _colour(rng), _colour(rng)
    t = 0.6 * _smooth(rng, int(rng.integers(2, 6))) + 0.4 * _ramp(rng)
    img = c0 + (c1 - c0) * t[..., None]
    img += (_smooth(rng, int(rng.integers(8, 20)), 3) - 0.5) * rng.uniform(10, 35)
    if rng.random() < 0.2:
        img += (_stripes(rng)[..., None] - 0.5) * rng.uniform(10, 25)
    return img


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Draw distractors that are labeled background on uint8 `img` (in place): strokes, arcs, blobs, dots."""
    aa = cv2.LINE_AA
    for _ in range(int(rng.integers(1, 6))):           # polylines
        n = int(rng.integers(2, 6))
        start = rng.uniform(-10, SIZE + 10, 2)
        pts = start + np.cumsum(rng.normal(0, 22, (n, 2)), 0)
        cv2.polylines(img, [np.round(pts * _ONE).astype(np.int32)], False, _colour(rng).tolist(),
                      int(rng.integers(1, 4)), aa, _SHIFT)
    for _ in range(int(rng.integers(0, 3))):           # open arcs (thin, never a closed ring)
        c = rng.uniform(0, SIZE, 2)
        r = rng.uniform(6, 28, 2)
        a0 = rng.uniform(0, 360)
        cv2.ellipse(img, (int(c[0]), int(c[1])), (int(r[0]), int(r[1])), rng.uniform(0, 180), a0,
                    a0 + rng.uniform(60, 250), _colour(rng).tolist(), int(rng.integers(1, 4)), aa)
    for _ in range(int(rng.integers(0, 3))):           # irregular blobs, smaller than objects
        k = 40
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        rad = np.zeros(k)
        for h in (2, 3, 4, 5):
            rad += rng.uniform(0.15, 0.4) * np.cos(h * t + rng.uniform(0, 2 * np.pi))
        rad = rng.uniform(4, 11) * np.exp(rad)
        c = rng.uniform(0, SIZE, 2)
        pts = c + np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
        cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], _colour(rng).tolist(), aa, _SHIFT)
    for _ in range(int(rng.integers(0, 7))):           # dots
        c = rng.uniform(0, SIZE, 2)
        cv2.circle(img, (int(c[0]), int(c[1])), int(rng.integers(1, 4)), _colour(rng).tolist(), -1, aa)


# -------------------------------------------------------------------------------------------- sample

def render(seed: int, index: int, ood: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of the dataset made with `seed`: (RGB image uint8 [H, W, 3], mask uint8 [H, W]).
    `ood`: an out-of-distribution image (`render_ood`)."""
    rng = np.random.default_rng([seed, OOD_STREAM + index] if ood else [seed, index])
    background = _background(rng)
    if ood:  # other backgrounds: a bold checker or stripe pattern over the usual noise
        background += (_checker(rng)[..., None] - 0.5) * rng.uniform(60, 140)
    canvas = np.clip(np.round(background), 0, 255).astype(np.uint8)
    _clutter(canvas, rng)                                # cv2 anti-aliases on 8-bit images only
    img = canvas.astype(np.float32)
    if ood:
        img = _distractors(img, rng)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(1, 4) if ood else rng.integers(2, 6))):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        radius = rng.uniform(12, 28)
        margin = 0.6 * radius
        # objects overlap, but a few tries keep one from hiding most of another
        for _ in range(10):
            center = rng.uniform(margin, SIZE - margin, 2)
            if all(np.hypot(*(center - c)) > 0.8 * max(radius, r) for c, r in placed):
                break
        placed.append((center, radius))
        aspect = np.exp(rng.uniform(-0.12, 0.12))
        angle = rng.uniform(0, 2 * np.pi)
        outlines = [_place(p, center, radius, aspect, angle) for p in _unit_shape(cls, rng)]
        alpha = _alpha(outlines)
        fill = _fill(rng)
        inside = alpha > 0.5
        if not inside.any():
            continue
        # keep the object visible: re-draw the fill colour a few times if it matches what lies beneath
        for _ in range(10):
            if np.abs(fill[inside].mean(0) - img[inside].mean(0)).sum() > 150:
                break
            fill = _fill(rng)
        if rng.random() < 0.25:                          # a darker or lighter outline
            edge = np.zeros((SIZE, SIZE), np.uint8)
            cv2.polylines(edge, outlines, True, 255, int(rng.integers(1, 3)), cv2.LINE_AA, _SHIFT)
            e = edge.astype(np.float32)[..., None] / 255.0 * alpha[..., None]
            fill = fill * (1 - e) + fill * rng.uniform(0.3, 1.6) * e
        img = img * (1 - alpha[..., None]) + fill * alpha[..., None]
        mask[inside] = cls
    # per-image photometrics: contrast, brightness, blur, sensor noise
    img = (img - img.mean()) * rng.uniform(0.75, 1.25) + img.mean() + rng.uniform(-25, 25)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.0))
    img += rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    if ood:  # another colour regime: a washed-out, low-saturation palette (channel mixing, lifted blacks)
        img = 70 + np.clip(img, 0, 255) @ OOD_COLOURS.T
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


# ------------------------------------------------------------------------------- out-of-distribution

OOD_STREAM = 1_000_000           # OOD sample i is drawn from default_rng([seed, OOD_STREAM + i])
NUM_OOD = 1000
OOD_MARKER = ".synthetic-ood"
OOD_LIST = "ood_images.txt"      # as `prepare-data coco-ood`: the `gen-pseudo --images` list
# rows: output R, G, B as a mix of input R, G, B (rows sum to 0.72: 70 + 0.72 x 255 < 255)
OOD_COLOURS = np.array([[0.45, 0.2, 0.07], [0.2, 0.42, 0.1], [0.12, 0.2, 0.4]], np.float32)


def _checker(rng: np.random.Generator) -> np.ndarray:
    """A hard-edged checker or stripe pattern in {0, 1} at a random angle and period."""
    a = rng.uniform(0, np.pi)
    period = rng.uniform(10, 30)
    u = (np.cos(a) * _XX + np.sin(a) * _YY) / period
    v = (-np.sin(a) * _XX + np.cos(a) * _YY) / period
    return ((np.floor(u) + (np.floor(v) if rng.random() < 0.5 else 0)) % 2).astype(np.float32)


def _distractors(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-3 filled stars or hexagons, object-sized but of no class (labeled background)."""
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.choice([5, 6]))
        t = np.pi / 2 + np.arange(2 * k if k == 5 else k) * np.pi / (k if k == 5 else k / 2)
        r = np.where(np.arange(len(t)) % 2, 0.45, 1.0) if k == 5 else np.ones(len(t))
        unit = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        radius = rng.uniform(12, 26)
        outline = _place(unit, rng.uniform(radius, SIZE - radius, 2), radius, 1.0, rng.uniform(0, 2 * np.pi))
        alpha = _alpha([outline])[..., None]
        img = img * (1 - alpha) + _fill(rng) * alpha
    return img


def render_ood(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-distribution sample `index`: the same shape classes (1-3 objects) on other backgrounds (bold
    checkers and stripes), with object-sized distractor shapes of no class (stars, hexagons: background),
    in another colour regime. The mask is the truth, for measuring pseudo-labels; SemiOVS never reads it."""
    return render(seed, index, ood=True)


def generate_ood(root: str | Path, seed: int = 0, count: int | None = None) -> tuple[int, int]:
    """`count` OOD images under `root`: images/, masks/ (truth, for measuring labels) and OOD_LIST (one
    `images/<name>` per line, the `gen-pseudo --images` input). Resumable like `generate`."""
    root, count = Path(root), NUM_OOD if count is None else count
    _claim(root, seed, OOD_MARKER, "synthetic-ood")
    names = [f"ood{i:05d}.png" for i in range(count)]
    written, skipped = _write_samples(root, names, lambda i: render_ood(seed, i), "synthetic-ood")
    write_split(root / "splits" / "truth.txt", [(f"images/{n}", f"masks/{n}") for n in names])
    (root / OOD_LIST).write_text("".join(f"images/{n}\n" for n in names))
    return written, skipped


# --------------------------------------------------------------------------------------------- files

def _write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    """Encode an RGB image as PNG at `path` atomically."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # cv2 wants BGR
    if not ok:
        raise OSError(f"cannot encode {path}")
    write_atomic(path, lambda f: f.write(buf.tobytes()))


def _claim(root: Path, seed: int, marker_name: str = MARKER, command: str = "synthetic") -> None:
    """Record which generator version and seed own `root`; refuse a root owned by another seed."""
    marker = root / marker_name
    want = f"version {VERSION} seed {seed}"
    if marker.is_file():
        have = marker.read_text().strip()
        if have != want:
            raise UserError(f"{root}: already holds {command} data made with {have}, not {want}; "
                            "use another root or delete this one")
        return
    images = root / "images"
    if images.is_dir() and any(images.iterdir()):
        raise UserError(f"{root}: images/ exists but was not made by `semiseg prepare-data {command}`; "
                        "use an empty root")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(want + "\n")


def _read_mask(path: Path) -> np.ndarray:
    """A mask this generator wrote earlier ('L' PNG); an unreadable one is a UserError naming it."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2 or mask.max(initial=0) >= len(SYNTHETIC_CLASSES):
        raise UserError(f"{path}: not a mask of this generator; delete it and run `semiseg prepare-data synthetic` "
                        "again")
    return mask


def _write_samples(root: Path, names: list[str], draw, desc: str,
                   image_labels: dict[str, list[int]] | None = None) -> tuple[int, int]:
    """images/<name> and masks/<name> of every sample `draw(i)` -> (rgb, mask) not yet complete; returns
    (written, skipped). `image_labels`, when given, gets the classes of every sample's mask (by file stem):
    from the drawn mask, or read back for a skipped sample."""
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    written = skipped = 0
    for i in progress(range(len(names)), total=len(names), desc=desc):
        image, mask = root / "images" / names[i], root / "masks" / names[i]
        if image.is_file() and mask.is_file():
            skipped += 1
            if image_labels is not None:
                image_labels[mask.stem] = labels_from_mask(_read_mask(mask), len(SYNTHETIC_CLASSES))
            continue
        rgb, labels = draw(i)
        save_index_png(labels, mask)
        _write_rgb_png(image, rgb)         # the image last: its presence with the mask marks a complete sample
        written += 1
        if image_labels is not None:
            image_labels[mask.stem] = labels_from_mask(labels, len(SYNTHETIC_CLASSES))
    return written, skipped


def generate(root: str | Path, seed: int = 0) -> tuple[int, int]:
    """Make the synthetic dataset under `root` (see the module docstring); returns (written, skipped).

    A second call with the same seed skips every complete sample; another seed into the same root is a
    UserError.
    """
    root = Path(root)
    seed = int(seed)
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    _claim(root, seed)
    total = NUM_LABELED + NUM_UNLABELED + NUM_VAL + NUM_TEST
    names = [f"{i:05d}.png" for i in range(total)]
    image_labels: dict[str, list[int]] = {}
    written, skipped = _write_samples(root, names, lambda i: render(seed, i), "synthetic", image_labels)
    write_image_labels(root / MASK_LABELS, image_labels)

    pairs = [(f"images/{n}", f"masks/{n}") for n in names]
    n_train = NUM_LABELED + NUM_UNLABELED
    train, val, test = pairs[:n_train], pairs[n_train:n_train + NUM_VAL], pairs[n_train + NUM_VAL:]
    splits = root / "splits"
    write_split(splits / "default" / "labeled.txt", train[:NUM_LABELED])
    write_split(splits / "default" / "unlabeled.txt", train[NUM_LABELED:])
    for k in (k for k in EXTRA_SPLITS if k < len(train)):
        write_split(splits / str(k) / "labeled.txt", train[:k])
        write_split(splits / str(k) / "unlabeled.txt", train[k:])
    write_split(splits / "val.txt", val)
    write_split(splits / "test.txt", test)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in SYNTHETIC_CLASSES))
    (root / "README.txt").write_text(
        f"Synthetic shapes dataset generated by `semiseg prepare-data synthetic` with seed {seed} "
        f"(generator version {VERSION}).\n"
        f"{len(train)} training images ({NUM_LABELED} labeled in splits/default, the rest unlabeled; "
        f"splits/<k> label the first k), {len(val)} validation images (splits/val.txt) and {len(test)} held-out test "
        f"images (splits/test.txt, never used to choose settings), {SIZE}x{SIZE} RGB.\n"
        f"masks/*.png hold class indices 0..{len(SYNTHETIC_CLASSES) - 1} ({', '.join(SYNTHETIC_CLASSES)}); "
        "the class is given by shape only, colours are drawn from one distribution for every class.\n"
        f"{MASK_LABELS} lists the classes each mask shows ('<image> <class> ...', background 0 implied).\n")
    return written, skipped
