"""SemiVL's language-guided decoder (`VLGHead`, config `vlm-vlg-aspp-s2p4-sk04-ftap-mcvitb`; SemiVL,
Hoyer et al., ECCV 2024, Sec. 3.3; specs/semivl_unimatch.md §4c).

From the dense CLIP embedding F [B,512,h,w] and K class text embeddings T [K,512]:
  1. cosine cost volume S = <F/|F|, T/|T|>                                  [B, K, h, w]
  2. spatial reasoning per class (classes folded into the batch): 7x7 conv 1 -> C, residual ASPP
  3. semantic reasoning: 2 class-attention layers over 4x4-pooled maps, tokens = classes with their
     projected text embedding appended, residual and upsampled back
  4. two up-blocks with skips from the ViT's value-path features of blocks 4 and 0 (or, for Cityscapes,
     block 4 and a ResNet stem), a 3x3 conv to one logit per class: output stride 4.
GroupNorm with C/16 groups everywhere, no BatchNorm, PyTorch's default initialisation (as the original).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels // 16, channels)


def conv_gn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         gn(cout), nn.ReLU(inplace=True))


class ImagePool(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = conv_gn_relu(c, c)

    def forward(self, x):
        return F.interpolate(self.conv(F.adaptive_avg_pool2d(x, 1)), size=x.shape[-2:], mode="bilinear",
                             align_corners=True)


class ResidualASPP(nn.Module):
    """ASPP (1x1, atrous 6/12/18, image pooling) whose projection is added to its input."""

    def __init__(self, c: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_gn_relu(c, c)] + [conv_gn_relu(c, c, 3, r) for r in rates] + [ImagePool(c)])
        self.project = conv_gn_relu(c * (len(rates) + 2), c)

    def forward(self, x):
        return x + self.project(torch.cat([b(x) for b in self.branches], dim=1))


class ClassAttention(nn.Module):
    """One semantic-reasoning layer: at each 4x4-pooled location the K classes are the tokens (visual C
    + text C channels, no positional encoding: permutation-equivariant over classes); the visual half of
    the output, upsampled, is added to the un-pooled input."""

    def __init__(self, c: int, text_c: int, heads: int = 4, pool: int = 4):
        super().__init__()
        self.pool = pool
        self.layer = nn.TransformerEncoderLayer(c + text_c, heads, dim_feedforward=2 * (c + text_c), dropout=0.0,
                                                activation="gelu", batch_first=True, norm_first=True)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [B, C, K, h, w], text [B, K, Ct] -> [B, C, K, h, w]."""
        b, c, k, h, w = x.shape
        # floor pooling as the original (a 51x51 grid gives 12x12); grids under 4x4 (tiny crops) pool to 1x1
        pooled = F.avg_pool2d(x.reshape(b, c * k, h, w), min(self.pool, h, w))  # [B, C*K, h', w']
        hp, wp = pooled.shape[-2:]
        tokens = pooled.reshape(b, c, k, hp * wp).permute(0, 3, 2, 1)           # [B, h'w', K, C]
        tokens = torch.cat([tokens, text[:, None].expand(b, hp * wp, k, text.shape[-1])], dim=-1)
        out = self.layer(tokens.reshape(b * hp * wp, k, -1))[..., :c]           # keep the visual part
        out = out.reshape(b, hp, wp, k, c).permute(0, 4, 3, 1, 2).reshape(b, c * k, hp, wp)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return x + out.reshape(b, c, k, h, w)


class Up(nn.Module):
    """x2 transposed conv to (cin - skip) channels, concat with the (resized, per-class repeated) skip,
    two 3x3 conv-GN-ReLU."""

    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin - skip, 2, stride=2)
        self.convs = nn.Sequential(conv_gn_relu(cin, cout, 3), conv_gn_relu(cout, cout, 3))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, k: int) -> torch.Tensor:
        x = self.up(x)
        skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=True)
        skip = skip.repeat_interleave(k, dim=0)                                  # image b -> rows b*K .. b*K+K-1
        return self.convs(torch.cat([x, skip], dim=1))


class VLGDecoder(nn.Module):
    """Language-guided decoder.

    Args:
        skip_in: channels of the two skip features, deepest first ((768, 768): ViT blocks 4 and 0;
            Cityscapes: (768, 256): block 4 and the ResNet stem's layer1).
        skip_channels: their projected widths ((32, 16); Cityscapes (32, 32)).
        embed_dim: CLIP embedding width (512), channels: C (128), text_channels: projected text width (128).

    forward(dense [B,E,h,w], skips [deep [B,*,h,w], shallow [B,*,h2,w2]], text [K,E]) -> logits
    [B, K, 4h, 4w] (output stride 4 relative to the ViT grid).

    Example:
        >>> dec = VLGDecoder()
        >>> dec(torch.randn(1, 512, 8, 12), [torch.randn(1, 768, 8, 12)] * 2, torch.randn(21, 512)).shape
        torch.Size([1, 21, 32, 48])
    """

    def __init__(self, embed_dim: int = 512, channels: int = 128, text_channels: int = 128,
                 skip_in=(768, 768), skip_channels=(32, 16), up_channels=(64, 32), layers: int = 2, heads: int = 4,
                 pool: int = 4, kernel: int = 7):
        super().__init__()
        self.spatial = nn.Sequential(nn.Conv2d(1, channels, kernel, padding=kernel // 2), ResidualASPP(channels))
        self.text_proj = nn.Sequential(nn.Linear(embed_dim, text_channels), nn.ReLU(inplace=True))
        self.class_attn = nn.ModuleList([ClassAttention(channels, text_channels, heads, pool) for _ in range(layers)])
        self.skip_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.ReLU(inplace=True))
                                        for ci, co in zip(skip_in, skip_channels)])
        self.up = nn.ModuleList([Up(channels, up_channels[0], skip_channels[0]),
                                 Up(up_channels[0], up_channels[1], skip_channels[1])])
        self.classifier = nn.Conv2d(up_channels[1], 1, 3, padding=1)

    def forward(self, dense: torch.Tensor, skips: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        b, _, h, w = dense.shape
        k = text.shape[0]
        text = F.normalize(text.float(), dim=-1).to(dense.dtype)
        cost = torch.einsum("bchw,kc->bkhw", F.normalize(dense, dim=1), text)  # cosine similarity
        x = self.spatial(cost.reshape(b * k, 1, h, w))                          # [B*K, C, h, w]
        c = x.shape[1]
        x = x.reshape(b, k, c, h, w).transpose(1, 2)                            # [B, C, K, h, w]
        t = self.text_proj(text)[None].expand(b, k, -1)
        for layer in self.class_attn:
            x = layer(x, t)
        x = x.transpose(1, 2).reshape(b * k, c, h, w)
        for up, proj, skip in zip(self.up, self.skip_proj, skips):
            x = up(x, proj(skip), k)
        return self.classifier(x).reshape(b, k, *x.shape[-2:])
