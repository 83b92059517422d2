"""`semiseg infer`: predictions for a folder, a file or a list of images.

Writes `<out>/<stem>.png` (index PNG with the dataset palette) per image and, with overlay,
`<out>/overlay/<stem>.png` (the image blended with the colour mask). Images are decoded in DataLoader
workers; consecutive images of the same size are stacked into one batch. A corrupt image is reported
and skipped; the others are written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semiseg_cli.console import err, progress
from semiseg_cli.data.facts import IGNORE_INDEX, palette
from semiseg_cli.data.reader import load_image
from semiseg_cli.data.transforms import normalize, resize_short_exact, to_uint8_tensor
from semiseg_cli.errors import UserError
from semiseg_cli.io import save_index_png, write_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(spec: str | Path) -> list[Path]:
    """A folder (its image files, sorted), one image file, or a text file listing one image per line
    (first token; relative paths are taken relative to the list's folder)."""
    spec = Path(spec)
    if spec.is_dir():
        files = sorted(p for p in spec.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{spec}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return files
    if not spec.is_file():
        raise UserError(f"{spec}: no such file or folder")
    if spec.suffix.lower() in IMAGE_SUFFIXES:
        return [spec]
    lines = [ln.split()[0] for ln in spec.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{spec}: the image list is empty")
    return [p if p.is_absolute() else spec.parent / p for p in map(Path, lines)]


class _Images(torch.utils.data.Dataset):
    def __init__(self, files, resize_short):
        self.files, self.resize_short = files, resize_short

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = load_image(self.files[i])
        except UserError as e:
            return i, None, None, str(e)
        net_in = resize_short_exact(img, self.resize_short) if self.resize_short else img
        return i, to_uint8_tensor(net_in), np.array(img), None


def overlay(image: np.ndarray, mask: np.ndarray, pal: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask into the image (ignore pixels keep the image)."""
    colour = pal[mask].astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colour * alpha
    return np.where((mask == IGNORE_INDEX)[..., None], image, blend.round()).astype(np.uint8)


@torch.no_grad()
def infer(model, cfg: dict, images: str | Path, out: str | Path, device: torch.device, crf: bool = False,
          with_overlay: bool = False, batch_size: int = 4, workers: int = 2) -> dict:
    """Predict every image of `images` into `out`. Returns {"written": n, "failed": [lines]}."""
    from semiseg_cli.crf import dense_crf
    from semiseg_cli.engine.evaluate import predict

    files = list_images(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if with_overlay:
        (out / "overlay").mkdir(exist_ok=True)
    pal = palette(cfg["dataset"]["name"])
    model.eval()
    loader = torch.utils.data.DataLoader(_Images(files, cfg["eval"]["resize_short"]), batch_size=None,
                                         num_workers=workers)
    failed, written, pending = [], 0, []

    def flush():
        nonlocal written
        if not pending:
            return
        x = normalize(torch.stack([t for _, t, _ in pending]).to(device))
        # flush() is called before a differently sized image joins, so all pending images share one size
        scores = predict(model, x, cfg, out_size=pending[0][2].shape[:2])
        for (i, _, image), s in zip(pending, scores.float().softmax(1).cpu().numpy()):
            if crf:
                c = cfg["crf"]
                s = dense_crf(image, s, c["iters"], c["gauss_sxy"], c["gauss_compat"], c["bilateral_sxy"],
                              c["bilateral_srgb"], c["bilateral_compat"])
            mask = s.argmax(0).astype(np.uint8)
            save_index_png(mask, out / f"{files[i].stem}.png", pal)
            if with_overlay:
                picture = Image.fromarray(overlay(image, mask, pal))
                write_atomic(out / "overlay" / f"{files[i].stem}.png", lambda f: picture.save(f, format="PNG"))
            written += 1
        pending.clear()

    for i, tensor, image, error in progress(loader, total=len(files), desc="infer"):
        if error:
            failed.append(error)
            err.print(f"skipped: {error}", markup=False)
            continue
        image = np.asarray(image)  # the loader's default_convert made it a tensor
        if pending and (len(pending) == batch_size or pending[0][1].shape != tensor.shape
                        or pending[0][2].shape != image.shape):
            flush()
        pending.append((i, tensor, image))
    flush()
    return {"written": written, "failed": failed, "out": str(out)}
