"""Reading samples from disk, with the checks that turn bad files into one clear line."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semiseg_cli.data.facts import IGNORE_INDEX
from semiseg_cli.errors import UserError


# Images over this many pixels are refused before decoding (a decompression bomb: a small file that would
# decode to gigabytes); raise it with the environment variable, e.g. SEMISEG_MAX_IMAGE_PIXELS=400000000.
MAX_PIXELS_ENV = "SEMISEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # the check below replaces PIL's warning / error with one line and an option


def check_pixels(im: Image.Image, path) -> None:
    """Refuse an image or mask over the pixel limit, from its header (before anything is decoded)."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        limit = int(value) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        raise UserError(f"{MAX_PIXELS_ENV}={value!r}: must be a whole number of pixels") from None
    w, h = im.size
    if w * h > limit:
        raise UserError(f"{path}: {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} (a guard against "
                        f"decompression bombs); raise it with {MAX_PIXELS_ENV}=N if the image is real")


def _to_rgb(im: Image.Image, path) -> Image.Image:
    """RGB of any PIL mode. Images of more than 8 bits per sample are scaled to 0..255 from their bit depth
    (PIL's own convert clips 16-bit values to 255, so a 16-bit grayscale photo would come out white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 255 if a.max(initial=0) <= 255 and im.mode == "I" else 65535
        if a.min(initial=0) < 0 or a.max(initial=0) > 65535:
            raise UserError(f"{path}: a {im.mode} image with values outside 0..65535; convert it to 8 or 16 bits")
        return Image.fromarray(np.round(a * (255 / top)).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise UserError(f"{path}: a floating-point image with values outside 0..1; convert it to 8 or 16 bits")
        return Image.fromarray(np.round(a * 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_image(path, where: str | None = None) -> Image.Image:
    """Open an image (a path, or a file object such as BytesIO with `where` naming it) as RGB (16-bit and float
    images scaled, see `_to_rgb`); a missing, corrupt or oversized file is a UserError naming it."""
    where = path if where is None else where
    try:
        with Image.open(path) as im:
            check_pixels(im, where)
            return _to_rgb(im, where)
    except FileNotFoundError:
        raise UserError(f"{where}: image not found; check dataset.root and the split list") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{where}: cannot decode image ({e}); replace or remove the file") from None


def load_mask(path: str | Path, size: tuple[int, int], num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
    """Read an index-PNG mask as uint8 [H, W] and check it against its image.

    Args:
        path: the mask file (single-channel or palette PNG holding class indices).
        size: (width, height) of the image it belongs to.
        num_classes: labels must be < num_classes or the ignore index 255.
        reduce_zero_label: ADE20K convention: 0 -> 255, v -> v - 1.
    """
    try:
        with Image.open(path) as im:
            check_pixels(im, path)
            if im.mode not in ("L", "P", "I;16", "I"):
                raise UserError(f"{path}: mask has mode {im.mode}; masks must be single-channel index PNGs "
                                "(colour masks need `semiseg prepare-data`)")
            if im.size != tuple(size):
                raise UserError(f"{path}: mask is {im.size[0]}x{im.size[1]} but its image is {size[0]}x{size[1]}")
            mask = np.array(im)
    except FileNotFoundError:
        raise UserError(f"{path}: mask not found; check dataset.root and the split list") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode mask ({e}); replace or remove the file") from None
    if reduce_zero_label:
        mask = mask.astype(np.int32) - 1
        mask[(mask == -1) | (mask == IGNORE_INDEX - 1)] = IGNORE_INDEX
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])[:5].tolist()
        raise UserError(f"{path}: label values {values} are outside 0..{num_classes - 1} (and not the ignore "
                        f"value {IGNORE_INDEX}); is dataset.name right, or does the dataset need prepare-data?")
    return mask.astype(np.uint8)
