"""CLIP ViT checkpoints -> `MaskClipViT` (SemiVL's backbone) plus a text-tower sidecar.

Formats:
- `openai-clip`: OpenAI's TorchScript archive (e.g. `ViT-B-16.pt`), read only through open_clip's OpenAI
  loader (`open_clip.load_openai_model`, fp32, CPU); a plain OpenAI-layout state dict is read with
  `weights_only=True`. OpenAI weights use QuickGELU.
- `open-clip`: an open_clip checkpoint or state dict, torch file or `.safetensors` (`{"state_dict": ...}`
  and DDP `module.` prefixes are unwrapped). The activation is read from the file if it says (`quick_gelu` or
  `model_cfg.quick_gelu`), else from open_clip's model config `--model-name` (default ViT-B-16).

The `visual.*` keys are renamed as in SemiVL's `convert_clip_weights.py` (spec semivl_unimatch.md §4a)
but to this project's names (table below); all tensors are cast to float32 (OpenAI stores fp16); the
architecture (width, layers, heads = width // 64, patch, grid, embed_dim) is inferred from the shapes and
the result must have exactly the keys and shapes of `MaskClipViT` built for it.

Converted file: a dict of tensors only (loadable with weights_only=True): the MaskClipViT state dict with
`pos_embed` at the source grid (resized at load by `MaskClipViT.load_converted`), plus int scalar tensors
`meta.width`, `meta.layers`, `meta.heads`, `meta.patch`, `meta.grid_h`, `meta.grid_w`, `meta.embed_dim`,
`meta.quick_gelu` recording the architecture (`MaskClipViT.from_file` builds from them).

Text sidecar `<DST stem>.text.pt`: every non-`visual.` key (open_clip's text tower, `logit_scale`) under
its own name plus `meta.quick_gelu`; read by `semiseg_cli.models.text_embeddings`. The mapping printout
shows these keys as `text:<key>`.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import torch

from semiseg_cli.convert.common import Converted, check_and_report, unwrap_state_dict
from semiseg_cli.models.text_embeddings import TEXT_SUFFIX
from semiseg_cli.errors import UserError

TARGET_KIND = ""  # the summary line names MaskClipViT itself, not a timm model

# visual.<key> -> MaskClipViT key
TOP = {
    "class_embedding": "cls_token",              # [W] -> [1, 1, W]
    "positional_embedding": "pos_embed",         # [1+g*g, W] -> [1, 1+g*g, W]
    "conv1.weight": "patch_embed.weight",        # no bias
    "ln_pre.weight": "ln_pre.weight", "ln_pre.bias": "ln_pre.bias",
    "ln_post.weight": "ln_post.weight", "ln_post.bias": "ln_post.bias",
    "proj": "proj.weight",                       # [W, E] -> transposed [E, W] (a Linear)
}
# visual.transformer.resblocks.<i>.<key> -> blocks.<i>.<key>
BLOCK = {
    "ln_1": "ln1", "attn.in_proj_weight": "attn.in_proj_weight", "attn.in_proj_bias": "attn.in_proj_bias",
    "attn.out_proj": "attn.out_proj", "ln_2": "ln2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
RESHAPE = {"cls_token": lambda t: t.reshape(1, 1, -1), "pos_embed": lambda t: t.unsqueeze(0),
           "proj.weight": lambda t: t.t().contiguous()}
# OpenAI TorchScript state dicts carry these ints as tensors; open_clip's loader drops them too
DROPPED = {"input_resolution": "image size (read from the shapes)", "context_length": "read from the shapes",
           "vocab_size": "read from the shapes"}


def rename(key: str) -> str | None:
    """MaskClipViT name of a `visual.`-stripped CLIP key, or None."""
    if key in TOP:
        return TOP[key]
    parts = key.split(".")
    if parts[:2] == ["transformer", "resblocks"] and len(parts) > 3:
        i, rest = parts[2], ".".join(parts[3:])
        for old, new in BLOCK.items():
            if rest == old or rest.startswith(old + "."):
                return f"blocks.{i}.{new}{rest[len(old):]}"
    return None


def infer_arch(visual: dict, src: str) -> dict:
    """MaskClipViT architecture from the shapes of the `visual.`-stripped keys."""
    need = ("conv1.weight", "class_embedding", "positional_embedding", "proj")
    missing = [k for k in need if k not in visual]
    if missing:
        raise UserError(f"{src}: not a CLIP ViT checkpoint (no visual.{missing[0]}); expected OpenAI's "
                        "ViT-B-16.pt (openai-clip) or an open_clip ViT checkpoint (open-clip)")
    width, _, patch, _ = visual["conv1.weight"].shape
    n = visual["positional_embedding"].shape[0] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise UserError(f"{src}: visual.positional_embedding has {n} grid entries, not a square grid")
    layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    return {"width": width, "layers": layers, "heads": width // 64, "patch": patch, "grid_h": grid, "grid_w": grid,
            "embed_dim": visual["proj"].shape[1]}


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with `code/` and `constants.pkl`; torch.save files have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _unwrap(obj, src: str) -> dict:
    sd = unwrap_state_dict(obj, src)
    return {k.removeprefix("module."): v for k, v in sd.items()}  # DistributedDataParallel prefixes


def load_openai(src: str) -> dict:
    from semiseg_cli.io import load_file

    path = Path(src)
    if not path.is_file():
        raise UserError(f"{src}: file not found")
    if not is_torchscript(path):
        return _unwrap(load_file(path), src)
    import open_clip

    try:  # TorchScript goes through open_clip's loader (DESIGN.md); an absolute path never names a download
        model = open_clip.load_openai_model(str(path.resolve()), precision="fp32", device="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here is a file the loader does not accept
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{src}: open_clip cannot load this OpenAI CLIP archive ({first})") from None
    return model.state_dict()


def _load_safetensors(src: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    if not Path(src).is_file():
        raise UserError(f"{src}: file not found")
    try:
        return _unwrap(load_safetensors(src), src)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{src}: not a readable safetensors file ({str(e).strip()[:160]})") from None


def load_open_clip(src: str) -> tuple[dict, bool | None]:
    """(state dict, quick_gelu if the checkpoint says, else None) of an open_clip checkpoint."""
    from semiseg_cli.io import load_file

    if str(src).endswith(".safetensors"):  # the open_clip files on the Hugging Face hub
        return _load_safetensors(src), None
    obj = load_file(src)
    quick = None
    if isinstance(obj, dict):
        cfg = obj.get("model_cfg")
        for said in (obj.get("quick_gelu"), cfg.get("quick_gelu") if isinstance(cfg, dict) else None):
            if isinstance(said, bool):
                quick = said
    return _unwrap(obj, src), quick


def config_quick_gelu(model_name: str) -> bool:
    """Whether open_clip's model config `model_name` uses QuickGELU (e.g. ViT-B-16: no, ViT-B-16-quickgelu: yes)."""
    import open_clip

    from semiseg_cli.errors import did_you_mean

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise UserError(f"--model-name {model_name!r} is not an open_clip model config"
                        f"{did_you_mean(model_name, open_clip.list_models())}")
    return bool(cfg.get("quick_gelu", False))


def _text_part(text_src: dict, quick: bool, src: str) -> tuple[dict, list, dict]:
    """The text-tower sidecar of the non-visual keys, checked against open_clip's TextTransformer."""
    from semiseg_cli.models.text_embeddings import build_text_tower, is_text_key, text_config

    mapping = [(k, f"text:{k}") for k in text_src if is_text_key(k)]
    text = {k: v for k, v in text_src.items() if is_text_key(k)}
    try:
        cfg = text_config(text)
    except UserError as e:
        raise UserError(f"{src}: the non-visual keys are {e}") from None
    with torch.device("meta"):
        reference = build_text_tower(cfg, quick).state_dict()
    if "logit_scale" in text:  # CLIP's temperature: kept, not part of the tower
        reference["logit_scale"] = text["logit_scale"]
    check_and_report(mapping, text_src, text, reference, "an open_clip text tower")
    return {**text, "meta.quick_gelu": torch.tensor(int(quick))}, mapping, cfg


def convert(fmt: str, src: str, backbone: str | None, model_name: str | None = None) -> Converted:
    from semiseg_cli.models.clip_vit import MaskClipViT

    if backbone:
        raise UserError(f"--backbone does not apply to {fmt}: the architecture is read from the file")
    if fmt == "openai-clip":
        sd, quick = load_openai(src), True
    else:
        sd, quick = load_open_clip(src)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # OpenAI stores fp16

    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    arch = infer_arch(visual, src)
    if quick is None:  # the checkpoint does not say: open_clip's model config does
        quick = config_quick_gelu(model_name or "ViT-B-16")
    mapping, converted, reasons = [], {}, {}
    for key, v in visual.items():
        new = rename(key)
        if new is not None:  # unknown keys stay out of `mapping`: check_and_report names them as unused
            mapping.append((f"visual.{key}", new))
            converted[new] = RESHAPE.get(new, lambda t: t)(v)
    with torch.device("meta"):  # shapes only, nothing allocated
        reference = MaskClipViT(arch["width"], arch["layers"], arch["heads"], arch["patch"],
                                (arch["grid_h"] * arch["patch"], arch["grid_w"] * arch["patch"]),
                                arch["embed_dim"], out_indices=()).state_dict()
    target = (f"MaskClipViT (width {arch['width']}, {arch['layers']} layers, {arch['heads']} heads, patch "
              f"{arch['patch']}, grid {arch['grid_h']}x{arch['grid_w']}, embed {arch['embed_dim']})")
    source_visual = {f"visual.{k}": v for k, v in visual.items()}
    check_and_report(mapping, source_visual, converted, reference, target)
    converted.update({f"meta.{k}": torch.tensor(int(v)) for k, v in {**arch, "quick_gelu": quick}.items()})

    rest = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    for key in DROPPED:
        if key in rest:
            mapping.append((key, None))
            reasons[key] = DROPPED[key]
            rest.pop(key)
    sidecars = {TEXT_SUFFIX: None}  # None: no text tower, remove a stale sidecar of an earlier DST
    if rest:
        text, text_mapping, _ = _text_part(rest, quick, src)
        mapping += text_mapping
        sidecars[TEXT_SUFFIX] = text
    return Converted(converted, mapping, target, reasons, sidecars)
