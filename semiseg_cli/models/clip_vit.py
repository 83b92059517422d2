"""CLIP ViT backbone with MaskCLIP value-path outputs: SemiVL's `MaskClipVisionTransformer`.

SemiVL (Hoyer et al., 2024) fine-tunes CLIP ViT-B/16 for segmentation and reads dense features with the
MaskCLIP trick (Zhou et al., 2022, "Extract Free Dense Labels from CLIP"): in a block's "value path" each
token attends only to itself, so the attention reduces to the value + output projections,

    v = x + W_o (W_v LN1(x) + b_v) + b_o;    v = v + FFN(LN2(v))        (spec semivl_unimatch.md §4b)

and the last block's value path, after ln_post and the CLIP projection, is a dense CLIP embedding that
can be compared with text embeddings pixel by pixel. The ordinary token path still runs through all blocks
with full attention: it feeds the next block (the value path of block i takes the tokens entering block i)
and the cls token's global embedding.

Facts followed (spec §4a/§4b): patch conv without bias and bottom/right zero padding to a multiple of the
patch; cls token; positional embedding resized bicubically (align_corners=False, cls entry kept) when the
token grid differs from the stored one; ln_pre *after* adding the positional embedding; pre-norm blocks.
SemiVL's backbone uses exact GELU and LayerNorm eps 1e-6 where CLIP uses QuickGELU (OpenAI weights) and
eps 1e-5 (spec §6.8): both are constructor options, the defaults are SemiVL's.

"Spatial fine-tuning" trains a parameter iff its name contains `attn` or `pos_embed` (Q, K, V and output
projections of every block, and the positional embedding): the parameter names here are chosen so that
this rule selects exactly those (`trainable_names`).

Example:
    >>> model = MaskClipViT(width=64, layers=3, heads=2, embed_dim=32, out_indices=(0, 1))
    >>> out = model(torch.randn(1, 3, 40, 56))
    >>> out["dense"].shape, [s.shape for s in out["skips"]], out["global"].shape
    (torch.Size([1, 32, 3, 4]), [torch.Size([1, 64, 3, 4]), torch.Size([1, 64, 3, 4])], torch.Size([1, 32]))
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.data.transforms import MEAN as IMAGENET_MEAN
from semiseg_cli.data.transforms import STD as IMAGENET_STD
from semiseg_cli.errors import UserError
from semiseg_cli.io import key_mismatches

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# A parameter is trained by SemiVL's spatial fine-tuning iff its name contains one of these.
TRAINABLE_KEYS = ("attn", "pos_embed")
# Architecture entries a converted file stores as int tensors under `meta.<name>` (see convert/clip.py).
META_KEYS = ("width", "layers", "heads", "patch", "grid_h", "grid_w", "embed_dim", "quick_gelu")


class QuickGELU(nn.Module):
    """CLIP's activation, x * sigmoid(1.702 x) (OpenAI weights were trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def resize_pos_embed(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize the grid part of a positional embedding [1, 1+gh*gw, C] to `new` (h, w);
    the cls entry is kept as is (mmseg `resize_pos_embed`, align_corners=False, no antialias)."""
    if tuple(old) == tuple(new):
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2)
    # bicubic interpolation is not implemented for half on every device: resize in float32
    grid = F.interpolate(grid.float(), size=tuple(new), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (in_proj = [Q; K; V])."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, value_path: bool = False, first_query_only: bool = False, keys: bool = False):
        """Returns (attention output, value path W_o(W_v h + b_v) + b_o of the non-cls tokens or None).

        `first_query_only`: only the cls token's output is needed (last block: the patch tokens' normal
        path is never used), so attend from that one query.
        """
        b, n, c = h.shape
        qkv = F.linear(h, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, head_dim]
        if first_query_only:
            q = q[:, :, :1]
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], c))
        # value path: the V part of the same projection, without mixing tokens
        value = self.out_proj(qkv[:, 1:, 2].reshape(b, n - 1, c)) if value_path else None
        # MaskCLIP's key smoothing reads the keys of the non-cls tokens, projected by out_proj as well
        key = self.out_proj(qkv[:, 1:, 1].reshape(b, n - 1, c)) if keys else None
        return out, value, key


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU() if act == "gelu" else QuickGELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (x = x + attn(ln1 x); x = x + mlp(ln2 x)) that can also return its
    MaskCLIP value path for the same input."""

    def __init__(self, width: int, heads: int, act: str, ln_eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = Mlp(width, 4 * width, act)

    def forward(self, x: torch.Tensor, value_path: bool = False, cls_only: bool = False, keys: bool = False):
        a, v, k = self.attn(self.ln1(x), value_path, first_query_only=cls_only, keys=keys)
        if v is not None:
            v = x[:, 1:] + v
            v = v + self.mlp(self.ln2(v))
        x = (x[:, :1] if cls_only else x) + a
        x = x + self.mlp(self.ln2(x))
        return x, v, k


class MaskClipViT(nn.Module):
    """CLIP ViT image tower returning MaskCLIP value-path features (SemiVL's backbone).

    Args:
        width: token dimension (768 for ViT-B).
        layers: number of transformer blocks (12).
        heads: attention heads (12; CLIP uses width // 64).
        patch: patch size (16).
        img_size: the size the stored positional embedding is made for; its grid is ceil(img_size / patch)
            (SemiVL: the training crop, 512 -> 32x32). Other inputs resize it on the fly.
        embed_dim: output dimension of the CLIP projection (512).
        act: "gelu" (exact GELU, SemiVL's choice) or "quick_gelu" (CLIP's).
        ln_eps: LayerNorm epsilon, 1e-6 (SemiVL) or 1e-5 (CLIP).
        out_indices: blocks whose value-path outputs are returned as `skips` (SemiVL: (0, 4)); the last
            block's value path always gives `dense`.

    Returns (forward): a dict with `skips` (list of [B, width, h, w]), `dense` ([B, embed_dim, h, w],
    L2-normalised over channels) and `global` ([B, embed_dim], proj(ln_post(cls)), L2-normalised), where
    h = ceil(H / patch), w = ceil(W / patch). Maps are channels-last strided views (no copy).
    """

    def __init__(self, width: int = 768, layers: int = 12, heads: int = 12, patch: int = 16,
                 img_size: int | Sequence[int] = 224, embed_dim: int = 512, act: str = "gelu",
                 ln_eps: float = 1e-6, out_indices: Sequence[int] = (0, 4)):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', not {act!r}")
        bad = [i for i in out_indices if not 0 <= i < layers]
        if bad:
            raise ValueError(f"out_indices {bad} outside 0..{layers - 1} (the last block's value path is `dense`)")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.width, self.layers, self.heads, self.patch, self.embed_dim = width, layers, heads, patch, embed_dim
        self.act, self.ln_eps, self.out_indices = act, ln_eps, tuple(out_indices)
        self.grid = (math.ceil(size[0] / patch), math.ceil(size[1] / patch))

        self.patch_embed = nn.Conv2d(3, width, patch, patch, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], width))
        self.ln_pre = nn.LayerNorm(width, eps=ln_eps)
        self.blocks = nn.ModuleList(Block(width, heads, act, ln_eps) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # CLIP's initialisation scales; only matters for tests and tiny CPU runs (real runs load CLIP)
        scale = self.width ** -0.5
        nn.init.normal_(self.cls_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=scale)
            nn.init.normal_(blk.attn.out_proj.weight, std=scale * (2 * self.layers) ** -0.5)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=scale * (2 * self.layers) ** -0.5)
        nn.init.normal_(self.proj.weight, std=scale)

    def forward(self, x: torch.Tensor, keys: bool = False) -> dict:
        """See the class docstring; with `keys` the dict also holds `keys` [B, h*w, width]: the last block's
        keys of the patch tokens after out_proj (MaskCLIP's key smoothing)."""
        b, _, H, W = x.shape
        pad_h, pad_w = -H % self.patch, -W % self.patch
        if pad_h or pad_w:  # SemiVL pads bottom/right with zeros (the tokens still attend to the padding)
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], 1)
        x = self.ln_pre(x + resize_pos_embed(self.pos_embed, self.grid, (h, w)).to(x.dtype))

        skips, last = [], self.layers - 1
        for i, blk in enumerate(self.blocks):
            # value path only where it is used; the last block's tokens only feed the cls output
            x, v, k = blk(x, value_path=i in self.out_indices or i == last, cls_only=i == last, keys=keys and i == last)
            if i in self.out_indices:
                skips.append(self._to_map(v, h, w))
        dense = F.normalize(self.proj(self.ln_post(v)), dim=-1)
        glob = F.normalize(self.proj(self.ln_post(x[:, 0])), dim=-1)
        out = {"skips": skips, "dense": self._to_map(dense, h, w), "global": glob}
        if keys:
            out["keys"] = k
        return out

    @staticmethod
    def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # [B, h*w, C] -> [B, C, h, w] as a view: its memory is channels-last, which convs like
        return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)

    def load_converted(self, state: dict, source: str | None = None, assign: bool = False) -> None:
        """Load a state dict written by `semiseg convert-weights openai-clip|open-clip`.

        The stored positional embedding may be for any grid (OpenAI's 14x14): it is resized bicubically to
        this model's grid (spec §4a). `meta.*` entries must agree with this model's architecture; every
        other key must be present with its shape. Mismatches raise a UserError (prefixed by `source`, e.g.
        the file name, when given). `assign=True` adopts the tensors instead of copying (a model built on
        the meta device).
        """
        where = f"{source}: " if source else ""
        state = dict(state)
        meta = {k[5:]: int(state.pop(k)) for k in list(state) if k.startswith("meta.")}
        for key in ("width", "layers", "heads", "patch", "embed_dim"):
            if key in meta and meta[key] != getattr(self, key):
                raise UserError(f"{where}the weights are for {key} = {meta[key]}, the model has {getattr(self, key)}")
        pos = state.get("pos_embed")
        if isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape[-1] == self.width:
            old = (meta["grid_h"], meta["grid_w"]) if "grid_h" in meta else (round(math.sqrt(pos.shape[1] - 1)),) * 2
            if old[0] * old[1] + 1 != pos.shape[1]:
                raise UserError(f"{where}pos_embed has {pos.shape[1]} entries, not 1 + {old[0]}x{old[1]}")
            state["pos_embed"] = resize_pos_embed(pos.float(), old, self.grid)
        problems = key_mismatches(self.state_dict(), state)
        if problems:
            raise UserError(f"{where}does not fit MaskClipViT: {', '.join(problems)}")
        self.load_state_dict(state, assign=assign)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "MaskClipViT":
        """Build the architecture recorded in a converted file and load it.

        `kwargs` (img_size, act, ln_eps, out_indices) are passed to the constructor; width, layers, heads,
        patch and embed_dim come from the file's `meta.*` entries. Without img_size the stored positional
        grid is kept (resized once per input size at run time, as MaskCLIP does).
        """
        from semiseg_cli.io import load_file

        state = load_file(path)
        if not isinstance(state, dict) or "meta.width" not in state:
            raise UserError(f"{path}: not a converted CLIP file (no meta.width); make it with "
                            "`semiseg convert-weights openai-clip ViT-B-16.pt DST`")
        arch = {k: int(state[f"meta.{k}"]) for k in ("width", "layers", "heads", "patch", "embed_dim")}
        if "img_size" not in kwargs and "meta.grid_h" in state:
            kwargs["img_size"] = (int(state["meta.grid_h"]) * arch["patch"], int(state["meta.grid_w"]) * arch["patch"])
        with torch.device("meta"):  # no random init of ~86M values that the file replaces anyway
            model = cls(**arch, **kwargs)
        try:
            model.load_converted(state, assign=True)
        except UserError as e:
            raise UserError(f"{path}: {e}; make it with `semiseg convert-weights openai-clip ViT-B-16.pt {path}`") from None
        return model


def clip_renorm(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised -> CLIP-normalised image (SemiVL's `renorm_clip_img`; CLIP was trained on its
    own mean/std)."""
    def col(v):
        return torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * col(IMAGENET_STD) + col(IMAGENET_MEAN) - col(CLIP_MEAN)) / col(CLIP_STD)


def is_trainable(name: str) -> bool:
    """SemiVL's spatial fine-tuning rule (`exclude_keys=['attn', 'pos_embed']` of a frozen backbone)."""
    return any(key in name for key in TRAINABLE_KEYS)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters spatial fine-tuning trains: Q/K/V/out projections of every block and the
    positional embedding (29,135,616 values for ViT-B/16 at crop 512)."""
    return [n for n, _ in model.named_parameters() if is_trainable(n)]


def freeze_for_spatial_finetuning(model: nn.Module) -> int:
    """Set requires_grad by `is_trainable` and return the number of trainable values."""
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
        count += p.numel() if p.requires_grad else 0
    return count
