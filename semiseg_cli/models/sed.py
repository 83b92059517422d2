"""SED (Xie et al., CVPR 2024, "SED: A Simple Encoder-Decoder for Open-Vocabulary Semantic Segmentation";
specs/semiovs_sed.md §2): the open-vocabulary segmenter whose labels SemiOVS trains on. Inference path only.

    image [B, 3, S, S] (CLIP-normalised in 0-255 units, S = 768)
      -> `SEDVisual`: open_clip's `convnext_large_d_320` image tower (timm ConvNeXt trunk + MLP head), run
         densely: res2..res5 (strides 4..32) and, per res5 pixel, trunk.head.norm -> head.mlp = a CLIP
         embedding [B, E, S/32, S/32]
      -> cost map: cosine of every pixel with every concept's per-template text embedding [T, P, E]
         (P = 80 ImageNet templates), no logit scale: [B, P, T, S/32, S/32]
      -> `Aggregator` (gradual fusion): a 7x7 conv over the P template channels per concept, then three
         `Up` stages (ConvNeXt block; linear attention across the T concepts; transposed conv; concat the
         projected res4/res3/res2 features and the upsampled cost map; double conv with GroupNorm)
      -> logits [B, T, S/4, S/4]; scores = sigmoid (independent per concept, not a softmax).

Module and parameter names equal SED's (`sem_seg_head.predictor.clip_model.visual.*` -> `visual.*`,
`sem_seg_head.predictor.transformer.*` -> `transformer.*`), so `convert-weights sed` is a prefix strip. The
architecture is built from depths and widths (`SED_L` is the released model; tests use tiny ones) and is
stored in the converted file as `meta.*` int tensors. The text tower lives in the `<stem>.text.pt` sidecar
(models/text_embeddings.py); `template_embeddings` gives the [T, P, E] text input.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.errors import UserError

# OpenAI CLIP's statistics in 0-255 units (SED's MODEL.CLIP_PIXEL_MEAN / STD)
CLIP_MEAN_255 = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD_255 = (68.5005327, 66.6321579, 70.3231630)
INPUT_SIZE = 768         # SED.clip_resolution: every image is resized to 768 x 768 (aspect ratio ignored)
SHORT_EDGE, MAX_SIZE = 640, 2560  # detectron2 ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)

# SED-L (configs/convnextL_768.yaml): open_clip convnext_large_d_320 + the ConvNeXt-L aggregator.
# num_heads is not in the weights (SED's NUM_HEADS: 4 for both released sizes).
SED_L = {"depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536], "embed_dim": 768, "mlp_hidden": 1536,
         "prompt_channel": 80, "hidden_dim": 128, "decoder_dims": [64, 32, 16], "guidance_proj_dims": [32, 16, 8],
         "kernel_sizes": [9, 9, 9], "num_heads": 4}
ARCH_KEYS = tuple(SED_L)


class SEDVisual(nn.Module):
    """open_clip's timm image tower (`TimmModel` with pool '' and an MLP projection): `trunk` = timm ConvNeXt,
    `head.mlp` = Linear(C, mlp_hidden) + GELU + Linear(mlp_hidden, E, bias=False); run densely."""

    def __init__(self, depths, dims, embed_dim: int, mlp_hidden: int):
        super().__init__()
        import timm
        from timm.layers import Mlp

        # open_clip: timm.create_model(name) then reset_classifier(0): the head keeps only its LayerNorm
        self.trunk = timm.create_model("convnext_large", pretrained=False, depths=tuple(depths), dims=tuple(dims),
                                       drop_path_rate=0.0)
        self.trunk.reset_classifier(0)
        self.head = nn.Sequential(OrderedDict(mlp=Mlp(dims[-1], mlp_hidden, embed_dim, bias=(True, False))))

    def forward(self, x: torch.Tensor) -> dict:
        """{"res2".."res5": stage outputs, "dense": [B, E, h, w] the CLIP head applied at every res5 pixel}."""
        out = {}
        x = self.trunk.stem(x)
        for i, stage in enumerate(self.trunk.stages):
            x = stage(x)
            out[f"res{i + 2}"] = x
        x = self.trunk.head.norm(self.trunk.norm_pre(x))  # the head's pooling is the identity on one pixel
        out["dense"] = self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out


class ConvNextBlock(nn.Module):
    """SED's decoder ConvNeXt block (its own names, not timm's): depthwise k x k conv, LayerNorm (eps 1e-6,
    channels last), Linear C -> 4C, GELU, Linear 4C -> C, per-channel gamma, residual; no drop path."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))  # SED initialises it to 1.0 (not ConvNeXt's 1e-6)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention ("Transformers are RNNs", SED's `LinearAttention`) over dim 1 (S tokens) of
    [N, S, H, D] tensors: phi(x) = elu(x) + 1, out = phi(Q) (sum_s phi(K_s)^T V_s / S) / (phi(Q) . sum_s phi(K_s)
    + eps) * S. (The division of V by S and the final * S are SED's fp16 guard; kept, they change rounding.)"""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = v.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, v / s)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * s


class AttentionLayer(nn.Module):
    """q, k, v projections and multi-head linear attention across concepts (no text guidance in SED-L)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):  # x [N, T, C]
        n, t, c = x.shape
        heads = [p(x).view(n, t, self.num_heads, c // self.num_heads) for p in (self.q, self.k, self.v)]
        return linear_attention(*heads).reshape(n, t, c)


class ClassTransformerLayer(nn.Module):
    """Pre-norm attention + MLP across the T concepts at every (pooled) pixel, then `x + up(pool(x) + delta)`.
    SED pools 2 x 2 in training and 1 x 1 at inference (`pool`, no weights), where the block output is
    `2x + delta`: the input counted twice, as the weights were trained."""

    def __init__(self, dim: int, num_heads: int, pool: int = 1):
        super().__init__()
        self.pool = pool
        self.attention = AttentionLayer(dim, num_heads)
        self.MLP = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, num_concepts: int) -> torch.Tensor:  # x [(B T), C, H, W]
        bt, c, h, w = x.shape
        b, t = bt // num_concepts, num_concepts
        p = F.avg_pool2d(x, self.pool) if self.pool > 1 else x
        hp, wp = p.shape[-2:]
        p = p.view(b, t, c, hp, wp).permute(0, 3, 4, 1, 2).reshape(b * hp * wp, t, c)
        p = p + self.attention(self.norm1(p))
        p = p + self.MLP(self.norm2(p))
        p = p.view(b, hp, wp, t, c).permute(0, 3, 4, 1, 2).reshape(bt, c, hp, wp)
        if (hp, wp) != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=True)
        return x + p


class DoubleConv(nn.Module):
    """(3x3 conv without bias -> GroupNorm(out / 16 groups) -> ReLU) x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(cout // 16, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(cout // 16, cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    """One gradual-fusion stage at 2x resolution: spatial (ConvNeXt) then class (attention) aggregation,
    ConvTranspose 2x2 to `cin - g` channels, concat the image guidance (g, shared by the T concept maps of an
    image) and the cost-map guidance (g), double conv to `cout`."""

    def __init__(self, cin: int, cout: int, guidance: int, num_heads: int, kernel_size: int, pool: int = 1):
        super().__init__()
        self.cnext = ConvNextBlock(cin, kernel_size)
        self.attention = ClassTransformerLayer(cin, num_heads, pool)
        self.up = nn.ConvTranspose2d(cin, cin - guidance, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin + guidance, cout)

    def forward(self, x, guidance, corr_guidance, num_concepts: int):
        x = self.up(self.attention(self.cnext(x), num_concepts))
        guidance = guidance.repeat_interleave(num_concepts, dim=0)  # image b -> rows b*T .. b*T + T-1
        return self.conv(torch.cat([x, guidance, corr_guidance], dim=1))


class Aggregator(nn.Module):
    """SED's gradual-fusion decoder (`sed/modeling/transformer/model.py::Aggregator`, ConvNeXt-L config)."""

    def __init__(self, dims, prompt_channel: int, hidden_dim: int, decoder_dims, guidance_proj_dims, kernel_sizes,
                 num_heads: int, pool: int = 1):
        super().__init__()
        guidance_dims = list(dims[2::-1])  # res4, res3, res2
        self.conv1 = nn.Conv2d(prompt_channel, hidden_dim, kernel_size=7, padding=3)
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, p, 3, padding=1), nn.ReLU()) for d, p in zip(guidance_dims, guidance_proj_dims))
        corr_dims = [prompt_channel] + list(guidance_proj_dims[:2])
        self.decoder_corr_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(d, p, 2, stride=2), nn.ReLU()) for d, p in zip(corr_dims, guidance_proj_dims))
        ins = [hidden_dim] + list(decoder_dims[:2])
        for i, (cin, cout, g, k) in enumerate(zip(ins, decoder_dims, guidance_proj_dims, kernel_sizes), start=1):
            setattr(self, f"decoder{i}", Up(cin, cout, g, num_heads, k, pool))
        # head0..head2: SED's auxiliary heads (training losses, SED-fast's early rejection); `head`: the output
        for name, c in (("head0", hidden_dim), ("head1", decoder_dims[0]), ("head2", decoder_dims[1]),
                        ("head", decoder_dims[2])):
            setattr(self, name, nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, dense: torch.Tensor, text: torch.Tensor, guidance: list) -> torch.Tensor:
        """dense [B, E, h, w] CLIP embeddings; text [T, P, E] per-template concept embeddings; guidance
        [res4, res3, res2]. Returns logits [B, T, 8h, 8w]."""
        b, t = dense.shape[0], text.shape[0]
        corr = torch.einsum("bchw,tpc->btphw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))
        corr = corr.flatten(0, 1)                                     # [(B T), P, h, w]
        x = self.conv1(corr)
        projected = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance)]
        corr_guidance = []
        for proj in self.decoder_corr_guidance_projection:
            corr = proj(corr)
            corr_guidance.append(corr)
        for i in range(3):
            x = getattr(self, f"decoder{i + 1}")(x, projected[i], corr_guidance[i], t)
        out = self.head(x)
        return out.view(b, t, *out.shape[-2:])


class SED(nn.Module):
    """forward(x [B, 3, S, S] CLIP-normalised 0-255 input, text [T, P, E]) -> concept logits [B, T, S/4, S/4]."""

    def __init__(self, arch: dict, pool: int = 1):
        super().__init__()
        self.arch = {k: arch[k] for k in ARCH_KEYS}
        a = self.arch
        self.visual = SEDVisual(a["depths"], a["dims"], a["embed_dim"], a["mlp_hidden"])
        self.transformer = Aggregator(a["dims"], a["prompt_channel"], a["hidden_dim"], a["decoder_dims"],
                                      a["guidance_proj_dims"], a["kernel_sizes"], a["num_heads"], pool)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if text.shape[1] != self.arch["prompt_channel"]:
            raise UserError(f"SED takes {self.arch['prompt_channel']} prompt templates per concept, "
                            f"the text has {text.shape[1]}")
        feats = self.visual(x)
        return self.transformer(feats["dense"], text.to(feats["dense"].dtype),
                                [feats["res4"], feats["res3"], feats["res2"]])

    @classmethod
    def from_file(cls, path: str | Path) -> "SED":
        """The model of a `convert-weights sed` file (architecture from its meta.* tensors), in eval mode."""
        from semiseg_cli.io import key_mismatches, load_file

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: SED weights not found; make them with "
                            f"`semiseg convert-weights sed sed_model_large.pth {path}`")
        state = load_file(path)
        if not isinstance(state, dict) or "meta.depths" not in state:
            raise UserError(f"{path}: not a `semiseg convert-weights sed` file (no meta.depths)")
        arch = {k: state[f"meta.{k}"].tolist() for k in ARCH_KEYS}
        weights = {k: v for k, v in state.items() if not k.startswith("meta.")}
        with torch.device("meta"):  # shapes only: the file's tensors are adopted below
            model = cls(arch)
        problems = key_mismatches(model.state_dict(), weights, kind="SED ")
        if problems:
            raise UserError(f"{path}: does not fit the SED architecture it records ({', '.join(problems)})")
        model.load_state_dict(weights, assign=True)
        return model.eval()


def arch_meta(arch: dict) -> dict:
    """The architecture as `meta.<key>` int tensors (what `SED.from_file` reads)."""
    return {f"meta.{k}": torch.tensor(arch[k], dtype=torch.long) for k in ARCH_KEYS}


def shortest_edge_size(w: int, h: int, short: int = SHORT_EDGE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output (w, h): the short side becomes `short`, the long side at most
    `max_size`, each rounded as int(x + 0.5)."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nw + 0.5), int(nh + 0.5)


def sed_input(img, size: int = INPUT_SIZE, short: int = SHORT_EDGE, max_size: int = MAX_SIZE) -> torch.Tensor:
    """What DefaultPredictor + `SED.forward` make of an RGB PIL image: shortest edge `short` (PIL bilinear),
    CLIP normalisation in 0-255 units, bilinear (align_corners=False) to size x size. Float [3, size, size]."""
    import numpy as np
    from PIL import Image

    new = shortest_edge_size(*img.size, short, max_size)
    if new != img.size:
        img = img.resize(new, Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    x = (x - torch.tensor(CLIP_MEAN_255).view(3, 1, 1)) / torch.tensor(CLIP_STD_255).view(3, 1, 1)
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
