"""The Python API: the functions the CLI calls, for notebooks and scripts.

    import semiseg_cli
    model = semiseg_cli.load("runs/demo/best.pt")              # any checkpoint `eval` / `infer` take
    mask, probs = model.predict("photo.jpg")                     # a path, a PIL image or an RGB uint8 array
    metrics = semiseg_cli.evaluate("runs/demo/best.pt")         # the `eval` metrics dict
    semiseg_cli.train({"method": "unimatch", "train": {"iters": 100}}, out="runs/x")   # a config dict or a recipe

`predict` runs the checkpoint exactly as `semiseg infer` does (its eval resize, mode, scales and flip;
`engine.infer.eval_input_of` + `model_scores`), `evaluate` is `semiseg eval`'s `engine.evaluate.evaluate` on
the configured val list, `train` is `semiseg train`'s `engine.trainer.train` on `config.load_config`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class Predictor:
    """A loaded checkpoint: `predict(image) -> (mask uint8 [H, W], probabilities float32 [K, H, W])`."""

    def __init__(self, cfg: dict, model, device):
        from semiseg_cli.engine.infer import eval_input_of, model_scores

        self.cfg, self.device = cfg, device
        self.model = model.to(device).eval()
        self._prepare, self._scores = eval_input_of(cfg), model_scores(self.model, cfg)

    @property
    def class_names(self) -> list[str]:
        from semiseg_cli.data.facts import class_names

        return list(class_names(self.cfg["dataset"]["name"], self.cfg["dataset"]["root"]))

    def predict(self, image, crf: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The prediction for one image: a path, a PIL image or an RGB uint8 array [H, W, 3]."""
        import torch
        from PIL import Image

        from semiseg_cli.crf import dense_crf
        from semiseg_cli.data.reader import load_image
        from semiseg_cli.errors import UserError

        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise UserError(f"predict takes an RGB uint8 array [H, W, 3], got {image.dtype} {list(image.shape)}")
            image = Image.fromarray(image)
        elif isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            raise UserError(f"predict takes a path, a PIL image or an RGB uint8 array, not {type(image).__name__}")
        with torch.no_grad():
            x = self._prepare(image)[None].to(self.device)
            probs = self._scores(x, [(image.height, image.width)])[0].float().cpu().numpy()
        if crf:
            probs = dense_crf(np.asarray(image), probs, **self.cfg["crf"])
        return probs.argmax(0).astype(np.uint8), probs


def _device(device):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load(checkpoint: str | Path, device=None, sets=()) -> Predictor:
    """A checkpoint (best.pt / last.pt, or a converted released model) ready to predict; `sets` are
    `--set`-style overrides ("dataset.root=/data/voc", "eval.mode=slide")."""
    from semiseg_cli.engine.checkpoint import model_from_checkpoint

    cfg, model = model_from_checkpoint(checkpoint, None, list(sets))
    return Predictor(cfg, model, _device(device))


def evaluate(checkpoint: str | Path, sets=(), device=None) -> dict:
    """`semiseg eval --checkpoint FILE`: the metrics dict (miou, per_class_iou, pixel_acc, ...)."""
    from semiseg_cli.data.dataset import build_dataset
    from semiseg_cli.distributed import DistEnv
    from semiseg_cli.engine.checkpoint import model_from_checkpoint
    from semiseg_cli.engine.evaluate import evaluate as run_eval

    cfg, model = model_from_checkpoint(checkpoint, None, list(sets))
    dev = _device(device)
    env = DistEnv(rank=0, world=1, local_rank=0, device=dev)
    return run_eval(model.to(dev), cfg, build_dataset(cfg, "val"), env, workers=cfg["train"]["workers"])


def train(config: dict | str, out: str | Path, sets=(), resume: bool = False) -> dict:
    """`semiseg train`: `config` is a recipe name / YAML path or a (partial) config dict over the defaults;
    `sets` are `--set`-style overrides on top. Returns the last evaluation's metrics ({} when `resume` finds
    the run already finished)."""
    from semiseg_cli.config import flatten, load_config
    from semiseg_cli.engine.trainer import train as run_train

    if isinstance(config, dict):
        overrides = [f"{k}={_yaml(v)}" for k, v in flatten(config).items()]
        cfg = load_config(None, overrides + list(sets))
    else:
        cfg = load_config(config, list(sets))
    return run_train(cfg, out, resume=resume)


def _yaml(value) -> str:
    """A value as `--set` parses it (YAML flow style, one line)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("\n...").strip()
