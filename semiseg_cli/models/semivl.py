"""SemiVL's model (Hoyer et al., ECCV 2024; specs/semivl_unimatch.md §4b, §4c): a CLIP ViT (MaskCLIP value
path, attention-only fine-tuning) + the language-guided decoder, with the class text embeddings as a fixed
buffer, so a checkpoint is self-contained for `eval` / `infer`.

Children (the optimizer's groups, `optim.lr_mult.<child>`): `backbone` (only Q/K/V/output projections and
the position embedding train: "spatial fine-tuning"), `head` (the decoder, LR x10 in the papers) and, for
Cityscapes, `conv_encoder` (a ResNet-v1c stem + layer1 whose stride-4 features replace the block-0 skip).

Text: the decoder's class embeddings come from open_clip's text tower of the same user-supplied CLIP
weights ("a photo of a {name}", cached beside the converted weights; semiseg_cli/models/text_embeddings.py).
Class-name lists live in semiseg_cli/data/class_names/*.json (a nested list = the definitions / concepts of
each class). Without weights (the CPU recipe's tiny random ViT) the text embeddings are fixed random unit
vectors drawn from a constant seed: the pipeline runs, the language prior is absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.facts import class_names
from semiseg_cli.errors import UserError, did_you_mean
from semiseg_cli.models.clip_vit import MaskClipViT, clip_renorm, freeze_for_spatial_finetuning
from semiseg_cli.models.prompts import SEMIVL as SEMIVL_TEMPLATE
from semiseg_cli.models.vlg_decoder import VLGDecoder

# model.backbone -> MaskClipViT architecture (a converted weights file must have the same one)
VIT_ARCHS: dict[str, dict] = {
    "clip-vit-b16": dict(width=768, layers=12, heads=12, patch=16, embed_dim=512),
    # CPU recipe and tests; heads = width // 64, as CLIP (so a converted tiny open_clip model fits)
    "clip-vit-tiny": dict(width=64, layers=3, heads=1, patch=16, embed_dim=32),
}
# model.backbone -> the blocks whose value-path features are the decoder's (shallow, deep) skips
SKIP_BLOCKS: dict[str, tuple[int, int]] = {"clip-vit-b16": (0, 4), "clip-vit-tiny": (0, 1)}
CLASS_NAMES_DIR = Path(__file__).resolve().parents[1] / "data" / "class_names"


def read_class_set(spec: str) -> tuple[list[str], list]:
    """(class names, nested class list) of a bundled class set (data/class_names/<spec>.json) or a JSON file.

    Two forms: a list of classes, each a name or a list of concepts (a concept: a name or a list of
    synonyms), named by their first name; or SED's grouping {"class_names": [K names], "groups": [K lists of
    concept strings]}, where ", " inside a concept string separates synonyms (SED's rule), e.g.
    "aeroplane, airplane, glider"."""
    path = Path(spec)
    if not path.is_file():
        path = CLASS_NAMES_DIR / f"{spec}.json"
        if not path.is_file():
            have = sorted(p.stem for p in CLASS_NAMES_DIR.glob("*.json"))
            raise UserError(f"class-name list {spec!r} not found (neither a bundled list nor a JSON file)"
                            f"{did_you_mean(spec, have)}; choose one of: {', '.join(have)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON class list ({e})") from None
    if isinstance(data, dict) and "groups" in data:
        names, groups = data.get("class_names"), data["groups"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(groups, list) \
                or not all(isinstance(g, list) and g and all(isinstance(c, str) for c in g) for g in groups):
            raise UserError(f"{path}: expected {{\"class_names\": [names], \"groups\": [[concept strings], ...]}}")
        if len(groups) != len(names):
            raise UserError(f"{path}: {len(groups)} concept groups for {len(names)} class names; "
                            "give one group per class, in class order")
        return names, [[c.split(", ") if ", " in c else c for c in g] for g in groups]

    def ok(entry, depth):
        return isinstance(entry, str) or (depth < 2 and isinstance(entry, list) and entry
                                          and all(ok(e, depth + 1) for e in entry))

    if not isinstance(data, list) or not data or not all(ok(c, 0) for c in data):
        raise UserError(f"{path}: expected a JSON list of classes, each a name or a list of concepts "
                        '(a concept: a name or a list of synonyms), e.g. ["aeroplane", ["background", "sky"]]')

    def first(entry):
        return entry if isinstance(entry, str) else first(entry[0])

    return [first(c) for c in data], data


def read_class_list(spec: str) -> list:
    """The nested class list of `read_class_set`."""
    return read_class_set(spec)[1]


def load_class_text(name: str | None, cfg: dict) -> list:
    """The class list `name` (`read_class_list`) checked against dataset.num_classes, or the dataset's class
    names when None."""
    if name is None:
        return class_names(cfg["dataset"]["name"], cfg["dataset"]["root"])
    names = read_class_list(name)
    path = name
    if len(names) != cfg["dataset"]["num_classes"]:
        raise UserError(f"{path}: {len(names)} classes, but dataset.num_classes is {cfg['dataset']['num_classes']}")
    return names


def embed_class_text(cfg: dict, names: list, average: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [N, E], owner [N]: the class of each row). A nested list gives one row per concept
    (owner = its class), or with `average` one row per class (the mean of its concepts' un-normalised
    embeddings, normalised: SemiVL's "conceptavg"). Without model.weights: fixed random unit vectors
    (`seed`), one per class."""
    if cfg["model"]["weights"]:
        from semiseg_cli.models.text_embeddings import concept_embeddings

        return concept_embeddings(cfg["model"]["weights"], names, SEMIVL_TEMPLATE, average=average)
    owner = torch.arange(len(names)) if average else torch.tensor(
        [k for k, n in enumerate(names) for _ in (n if isinstance(n, list) else [n])])
    dim = VIT_ARCHS[cfg["model"]["backbone"]]["embed_dim"]
    emb = torch.randn(len(owner), dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(emb, dim=-1), owner


def vit_arch(name: str) -> dict:
    if name not in VIT_ARCHS:
        raise UserError(f"model.backbone {name!r} is not a SemiVL ViT{did_you_mean(name, VIT_ARCHS)}; "
                        f"choose one of: {', '.join(VIT_ARCHS)}")
    return VIT_ARCHS[name]


def load_vit_weights(vit: MaskClipViT, path: str) -> None:
    """Load `model.weights` (made by `semiseg convert-weights openai-clip|open-clip`) into `vit`."""
    from semiseg_cli.models import read_weights_file

    hint = f"semiseg convert-weights openai-clip ViT-B-16.pt {path}"
    state = read_weights_file(path, hint)
    try:
        vit.load_converted(state)
    except UserError as e:
        raise UserError(f"{path}: not a converted CLIP file for this model ({e}); make it with `{hint}`") from None


class SemiVLModel(nn.Module):
    """CLIP ViT + language-guided decoder (+ ResNet stem for Cityscapes).

    forward(x [B,3,H,W] ImageNet-normalised, need_fp=False) -> logits [B,K,H,W], or with need_fp the pair
    (clean, feature-perturbed) logits: Dropout2d(0.5) on every decoder input feature (UniMatch's FP stream
    as SemiVL applies it; the text embeddings are never perturbed).
    """

    def __init__(self, cfg: dict, text: torch.Tensor):
        super().__init__()
        m = cfg["model"]
        self.conv_encoder = None
        if m["conv_encoder"]:
            import timm

            # ResNet-v1c stem (3->32->32->64, max-pool) + layer1: 256 channels at stride 4
            self.conv_encoder = timm.create_model(m["conv_encoder"], pretrained=False, features_only=True,
                                                  out_indices=(1,))
            skip_ch = self.conv_encoder.feature_info.channels()[0]
        arch = vit_arch(m["backbone"])
        shallow, deep = SKIP_BLOCKS[m["backbone"]]
        self.backbone = MaskClipViT(**arch, img_size=cfg["train"]["crop_size"], act=m["vit_act"], ln_eps=m["vit_ln_eps"],
                                    out_indices=(deep,) if self.conv_encoder else (shallow, deep))
        width = arch["width"]
        self.head = VLGDecoder(embed_dim=arch["embed_dim"],
                               skip_in=(width, skip_ch) if self.conv_encoder else (width, width),
                               skip_channels=(32, 32) if self.conv_encoder else (32, 16))
        self.register_buffer("text", text.float())  # [K, E], fixed: saved in checkpoints, never trained
        self.renorm_clip = m["renorm_clip"]
        freeze_for_spatial_finetuning(self.backbone)  # only Q/K/V/out projections and pos_embed train

    def vit_input(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT gets the ImageNet-normalised image, or (Cityscapes, renorm_clip) CLIP's normalisation."""
        if not self.renorm_clip:
            return x
        return clip_renorm(x)

    def forward(self, x: torch.Tensor, need_fp: bool = False):
        h, w = x.shape[-2:]
        out = self.backbone(self.vit_input(x))
        skips = out["skips"][::-1]                                    # deepest first: block 4, then block 0
        if self.conv_encoder is not None:
            skips = [skips[0], self.conv_encoder(x)[0]]
        feats = [out["dense"], *skips]
        if need_fp:
            feats = [torch.cat([f, F.dropout2d(f, 0.5, self.training)]) for f in feats]
        logits = self.head(feats[0], feats[1:], self.text)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.chunk(2) if need_fp else logits


def build_semivl(cfg: dict) -> SemiVLModel:
    """The SemiVL model with `model.weights` loaded into the ViT and the decoder's text embeddings computed
    from the same weights (`model.class_text`, averaged per class with `model.class_text_avg`)."""
    m = cfg["model"]
    names = load_class_text(m["class_text"], cfg)
    text, _ = embed_class_text(cfg, names, average=m["class_text_avg"], seed=0)
    if text.shape[0] != cfg["dataset"]["num_classes"]:
        raise UserError(f"model.class_text gives {text.shape[0]} embeddings for {cfg['dataset']['num_classes']} classes; "
                        "set model.class_text_avg=true for a list of class definitions")
    model = SemiVLModel(cfg, text)
    if m["weights"]:
        load_vit_weights(model.backbone, m["weights"])
    if m["conv_encoder"] and m["conv_encoder_weights"]:
        from semiseg_cli.models import convert_hint, load_backbone_weights

        path = m["conv_encoder_weights"]
        load_backbone_weights(model, path, convert_hint(m["conv_encoder"], path), part="conv_encoder",
                              key="model.conv_encoder_weights")
    return model
