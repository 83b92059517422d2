"""`semiseg infer`: predictions for a folder, a file or a list of images.

Writes `<out>/<stem>.png` (index PNG with the dataset palette) per image and, with overlay,
`<out>/overlay/<stem>.png` (the image blended with the colour mask). Images are decoded in DataLoader
workers; consecutive images of the same size are stacked into one batch. A corrupt image is reported
and skipped; the others are written. The output folder is checked before any image is read, a full disk
is one line naming the file, and the folders written are named on stderr at the end.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semiseg_cli.console import err, progress
from semiseg_cli.data.facts import IGNORE_INDEX, palette
from semiseg_cli.data.reader import load_image
from semiseg_cli.data.transforms import eval_resize, eval_resize_of, normalize, to_uint8_tensor
from semiseg_cli.errors import UserError, check_output_dir, writing
from semiseg_cli.io import save_index_png

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
    data = spec.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise UserError(f"{spec}: not an image list (binary data, not UTF-8 text); pass a folder, an image file "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}) or a text file with one image path per line")
    lines = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{spec}: the image list is empty")
    return [p if p.is_absolute() else spec.parent / p for p in map(Path, lines)]


def check_unique_stems(files: list[Path], what: str = "masks") -> None:
    """Outputs are named by the input's stem: refuse two inputs whose outputs would overwrite each other."""
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise UserError(f"{f} and {seen[f.stem]} have the same stem (file name): both {what} would be {f.stem}.png; "
                            "rename one, or pass them in separate runs with different --out folders")
        seen[f.stem] = f


def eval_input(img: Image.Image, short: int | None = None, scale=None) -> torch.Tensor:
    """The network input of an evaluated model: `eval_resize`, uint8 [3, h, w] (normalised on the device)."""
    return to_uint8_tensor(eval_resize(img, short, scale))


def eval_input_of(cfg: dict):
    """`eval_input` with a config's eval resize: the `prepare` function of `predict_images` for a model."""
    return partial(eval_input, **eval_resize_of(cfg))


class _Images(torch.utils.data.Dataset):
    def __init__(self, files, prepare):
        self.files, self.prepare = files, prepare

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = load_image(self.files[i])
        except UserError as e:
            return i, None, None, str(e)
        return i, self.prepare(img), np.array(img), None


def overlay(image: np.ndarray, mask: np.ndarray, pal: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask into the image with opacity `alpha`. Ignore pixels and classes drawn black
    (VOC's and the synthetic set's background) keep the image: blending black would only darken it."""
    colour = pal[mask].astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colour * alpha
    keep = (mask == IGNORE_INDEX) | (pal[mask] == 0).all(-1)
    return np.where(keep[..., None], image, blend.round()).astype(np.uint8)


@torch.no_grad()
def predict_images(score_fn, files: list[Path], prepare, device: torch.device, batch_size: int = 4,
                   workers: int = 2, crf: dict | None = None, desc: str = "infer"):
    """The one image-prediction loop of `infer` and `gen-pseudo`: decode `files` in DataLoader workers, make
    each image's network input there, stack consecutive inputs of one shape into batches of at most
    `batch_size`, and yield for each file, in order, `(index, image uint8 [H, W, 3], scores float32 [K, H, W])`,
    or `(index, None, error line)` for a file that cannot be read.

    Args:
        score_fn: (stacked inputs [B, ...] on `device`, the images' sizes [(H, W)] * B, their files) -> per-image
            scores [K, H, W] at each image's size (`model_scores` for a model run as `eval` runs it).
        prepare: PIL RGB image -> the network input tensor (picklable: it runs in the workers), e.g.
            `eval_input_of(cfg)`; images whose inputs have one shape share a batch whatever their sizes.
        crf: dense-CRF parameters (the `crf` config section) to refine the scores with, or None.
    """
    from semiseg_cli.crf import dense_crf

    loader = torch.utils.data.DataLoader(_Images(files, prepare), batch_size=None, num_workers=workers)
    pending = []

    def flush():
        x = torch.stack([t for _, t, _ in pending]).to(device)
        scores = score_fn(x, [image.shape[:2] for _, _, image in pending], [files[i] for i, _, _ in pending])
        for (i, _, image), s in zip(pending, scores):
            s = s.float().cpu().numpy()
            if crf is not None:
                s = dense_crf(image, s, **crf)
            yield i, image, s
        pending.clear()

    for i, tensor, image, error in progress(loader, total=len(files), desc=desc):
        if error:
            yield i, None, error
            continue
        image = np.asarray(image)  # the loader's default_convert made it a tensor
        if pending and (len(pending) == batch_size or pending[0][1].shape != tensor.shape):
            yield from flush()
        pending.append((i, tensor, image))
    if pending:
        yield from flush()


def model_scores(model, cfg: dict, image_labels: dict | None = None):
    """The score function of a model (inputs from `eval_input_of(cfg)`): softmax probabilities of the
    prediction `eval` makes (its eval.mode, scales and flip; engine/evaluate.py `predict` and `probabilities`),
    one prediction per group of images of one size. `image_labels` (id = file stem -> its foreground classes,
    data/image_labels.py): the classes each image may hold, for a model with its own inference (SLRNet's
    --use_cls_label 1: how its two-stage pseudo-labels are made)."""
    from semiseg_cli.engine.evaluate import own_inference, predict, probabilities

    model.eval()
    if image_labels is not None and not own_inference(model):
        raise UserError("--image-labels applies to a model with its own inference (SLRNet); this checkpoint's "
                        f"{cfg['model']['name']} predicts every class")

    def labels_of(files) -> torch.Tensor:
        out = torch.zeros(len(files), cfg["dataset"]["num_classes"] - 1)
        for row, f in zip(out, files):
            if f.stem not in image_labels:
                raise UserError(f"{f}: no line for {f.stem!r} in the --image-labels file; add it or leave the image out")
            row[[c - 1 for c in image_labels[f.stem]]] = 1
        return out

    def scores(x: torch.Tensor, sizes: list, files: list | None = None) -> list:
        x = normalize(x)
        out = [None] * len(sizes)
        labels = labels_of(files).to(x.device) if image_labels is not None else None
        for size in dict.fromkeys(map(tuple, sizes)):
            idx = [i for i, s in enumerate(sizes) if tuple(s) == size]
            given = labels[idx] if labels is not None else None
            for i, p in zip(idx, probabilities(predict(model, x[idx], cfg, out_size=size, labels=given), cfg, model)):
                out[i] = p
        return out

    return scores


@torch.no_grad()
def infer(model, cfg: dict, images: str | Path, out: str | Path, device: torch.device, crf: bool = False,
          with_overlay: bool = False, batch_size: int = 4, workers: int = 2, opacity: float = 0.5) -> dict:
    """Predict every image of `images` into `out`. Returns {"written": n, "failed": [lines], "out"}.
    Overlays blend the colour mask with `opacity` and carry a legend of the classes present."""
    from semiseg_cli.data.facts import class_names
    from semiseg_cli.plot import overlay_with_legend

    out = Path(out)  # (--opacity in [0, 1] and --batch-size >= 1 are checked by the CLI's options)
    check_output_dir(out)
    files = list_images(images)
    check_unique_stems(files)
    out.mkdir(parents=True, exist_ok=True)
    if with_overlay:
        (out / "overlay").mkdir(exist_ok=True)
    pal = palette(cfg["dataset"]["name"])
    names = class_names(cfg["dataset"]["name"], cfg["dataset"]["root"]) if with_overlay else []
    failed, written = [], 0
    for i, image, scores in predict_images(model_scores(model, cfg), files, eval_input_of(cfg), device,
                                           batch_size, workers, cfg["crf"] if crf or cfg["eval"]["crf"] else None):
        if image is None:
            failed.append(scores)
            err.print(f"skipped: {scores}", markup=False)
            continue
        mask = scores.argmax(0).astype(np.uint8)
        with writing(out / f"{files[i].stem}.png"):
            save_index_png(mask, out / f"{files[i].stem}.png", pal)
        if with_overlay:
            with writing(out / "overlay" / f"{files[i].stem}.png"):
                overlay_with_legend(overlay(image, mask, pal, opacity), mask, pal, names,
                                    out / "overlay" / f"{files[i].stem}.png")
        written += 1
    if written:
        err.print(f"wrote {written} mask(s) to {out}", markup=False)
    if with_overlay and written:
        err.print(f"wrote {written} overlay(s) to {out / 'overlay'}", markup=False)
    return {"written": written, "failed": failed, "out": str(out)}
