"""Reading samples from disk, with the checks that turn bad files into one clear line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semiseg_cli.data.facts import IGNORE_INDEX
from semiseg_cli.errors import UserError


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file is a UserError naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image not found; check dataset.root and the split list") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode image ({e}); replace or remove the file") from None


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
