"""SLRNet's building blocks as plain torch modules and functions.

SLRNet: J. Pan et al., "Learning Self-Supervised Low-Rank Network for Single-Stage Weakly and
Semi-Supervised Semantic Segmentation", IJCV 2022 (arXiv 2203.10278); official code DesertsP/SLRNet, whose
head (ASPP, GCI, Stochastic Gate, nGWP + focal penalty, PAMR) comes from 1-stage-wseg (Araslanov & Roth,
CVPR 2020). Facts: specs/slrnet_s4mc.md part A and specs/checked_against_originals.md ("SLRNet").

What is here (written from the formulas; the originals were read for facts only):

* `pamr` - pixel-adaptive mask refinement: an affinity over 8 neighbours x 6 dilations computed from the
  image colours (scaled by the local colour std), applied `iters` times to the masks. Used without gradient
  to turn the averaged view masks into pseudo masks.
* `CVLR` - the cross-view low-rank module: the stride-4 features of both views are factorised per image as
  X ~ D Z with one dictionary D (K bases, initialised from the aux head's class-soft means of view 1) and
  per-view codes Z, by T unrolled attention-style updates; the rank-K reconstruction is added back to X.
* `GCI` - global cue injection: AdaIN-like modulation of the shallow features by global-max-pooled
  statistics of the deep features.
* `StochasticGate` - mixes deep and shallow features, stochastically in training, linearly at test time.
* `ngwp_scores` - image-level class scores from masks: normalised global weighted pooling of the logits
  plus the focal mask-size penalty, background dropped.
* `ASPP` - output-stride-8 ASPP whose BatchNorms always run in eval mode (affine parameters still train).
* `init_new_layers` - Kaiming-normal convs, norm layers weight 1 / bias 0, Linear layers left at
  PyTorch's default (as the original treats CVLR's two Linears).

Parameter names of GCI (`fc_deep`, `fc_skip`, `fc_cls`), ASPP (`aspp1..`, `global_avg_pool`, `conv1`, `bn1`)
and CVLR (`transform1`, `transform2`) follow the released checkpoints' keys so that a converter can map
them one to one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg_cli.errors import UserError

__all__ = ["pamr", "CVLR", "GCI", "StochasticGate", "ngwp_scores", "ASPP", "init_new_layers"]

# The head's BatchNorm settings in the original (single_stage.py: BN_MOMENTUM 0.05, BN_EPS 1e-5); GCI and
# ASPP are built with that norm layer there, so both use momentum 0.05 here too.
BN_MOMENTUM = 0.05
BN_EPS = 1e-5


def _bn(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM, affine=affine)


def _l2norm(x: Tensor, dim: int) -> Tensor:
    # The original's eps form: x / (1e-6 + ||x||), not F.normalize's x / max(||x||, eps).
    return x / (1e-6 + x.norm(dim=dim, keepdim=True))


# --------------------------------------------------------------------------------------------------------
# PAMR
# --------------------------------------------------------------------------------------------------------
# The 8 neighbour offsets of a 3x3 window (centre excluded), in units of the dilation.
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _replicate_pad(x: Tensor, pad: int) -> Tensor:
    """Replicate-pad the last two dims by `pad` on every side. Done with clamped index gathers rather
    than F.pad(mode='replicate') so that it works for any pad size and any dtype/memory format."""
    h, w = x.shape[-2:]
    rows = torch.arange(-pad, h + pad, device=x.device).clamp_(0, h - 1)
    cols = torch.arange(-pad, w + pad, device=x.device).clamp_(0, w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _shifted(xp: Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """View of the padded tensor holding, at (i, j), the value at (i + dy, j + dx) of the unpadded one."""
    return xp[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def pamr(image: Tensor, masks: Tensor, iters: int = 10,
         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> Tensor:
    """Pixel-adaptive mask refinement (1-stage-wseg's PAMR as SLRNet uses it).

    image: (B, C, H, W) (RGB in [0, 1] in SLRNet, already resized by the caller to the masks' size);
    masks: (B, K, H, W). Returns refined masks (B, K, H, W) in masks' dtype.

    For every pixel i and its 8 neighbours j at each dilation d (48 neighbours for 6 dilations; the centre
    is not a neighbour), with replicate padding at the borders:
      sigma_i,c = unbiased std (torch's default) of channel c over the 3x3 window incl. the centre at every
                  dilation (9 x len(dilations) samples, so the centre counts once per dilation),
      a_ij      = softmax_j( mean_c( -|I_i,c - I_j,c| / (1e-8 + 0.1 sigma_i,c) ) ),
    and each iteration replaces m_i by sum_j a_ij m_j.
    """
    if image.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"pamr expects 4-D image and masks, got {tuple(image.shape)} and {tuple(masks.shape)}")
    if image.shape[0] != masks.shape[0] or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"pamr: image {tuple(image.shape)} and masks {tuple(masks.shape)} differ in batch or "
                         "size (resize the image to the masks' size first)")
    dilations = tuple(int(d) for d in dilations)
    if not dilations or min(dilations) < 1:
        raise ValueError(f"pamr: dilations must be positive integers, got {dilations}")
    if iters < 0:
        raise ValueError(f"pamr: iters must be >= 0, got {iters}")

    out_dtype = masks.dtype
    # Half/bfloat16 are computed in float32: 1e-8 underflows to 0 in float16, which would turn a flat
    # (sigma = 0) window into 0/0. float64 stays float64.
    dtype = torch.promote_types(image.dtype, masks.dtype)
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        dtype = torch.float32
    image = image.to(dtype)
    masks = masks.to(dtype)
    _, _, h, w = masks.shape
    pad = max(dilations)

    # --- affinity from the image -------------------------------------------------------------------
    ip = _replicate_pad(image, pad)
    window = [_shifted(ip, pad, dy * d, dx * d, h, w)
              for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    sigma = torch.stack(window, dim=2).std(dim=2)                       # (B, C, H, W), unbiased
    scale = 1e-8 + 0.1 * sigma
    logits = torch.stack([(-(image - _shifted(ip, pad, dy * d, dx * d, h, w)).abs() / scale).mean(1)
                          for d in dilations for dy, dx in _NEIGHBOURS], dim=1)  # (B, P, H, W)
    aff = logits.softmax(dim=1)
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in _NEIGHBOURS]   # same order as `aff`

    # --- propagate the masks ------------------------------------------------------------------------
    # Accumulate neighbour by neighbour instead of stacking (B, K, 48, H, W): same result, 48x less memory.
    for _ in range(iters):
        mp = _replicate_pad(masks, pad)
        new = torch.zeros_like(masks)
        for p, (oy, ox) in enumerate(offsets):
            new.addcmul_(aff[:, p:p + 1], _shifted(mp, pad, oy, ox, h, w))
        masks = new
    return masks.to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# CVLR
# --------------------------------------------------------------------------------------------------------
class CVLR(nn.Module):
    """Cross-view low-rank module (SLRNet's DictionaryInitialization + FactorizationReconstruction).

    forward(views, init_logits):
      views: list of 1 (test time) or 2 (training) feature maps (B, C, Hi, Wi) sharing B and C;
      init_logits: the aux head's logits of view 1 (B, K, H1, W1), K = classes incl. background.
    Returns (enhanced features per view, codes per view (B, K, Hi, Wi), final bases (B, K, C)).

    Per image b (bases are per image, never shared across the batch), with X = [X^1, X^2] (N x C, the pixels
    of all views concatenated):
      A0 = softmax_K(init_logits), each class row divided by (its pixel sum + 1e-6);
      D0 = A0 X^1 (K x C), a soft class mean of view 1's features; init_logits and D0 are detached, so no
           gradient flows through the initialisation;
      X' = W1 X + b1 (not normalised), D = l2norm_C(W1 D0 + b1) (the same Linear);
      T times: Z = softmax_K(D X'^T / temperature); A = (Z + 1e-6) normalised over pixels;
               D = l2norm_C(A X');
      R = ReLU(Z^T D) with the last Z and the updated D; X~ = ReLU(X + W2 R + b2), a residual on the
      original (pre-W1) features.
    """

    def __init__(self, channels: int = 256, iters: int = 1, temperature: float = 1.0):
        super().__init__()
        self.channels = int(channels)
        # Default PyTorch init, as in the original (init_new_layers leaves Linear layers alone).
        self.transform1 = nn.Linear(self.channels, self.channels)
        self.transform2 = nn.Linear(self.channels, self.channels)
        self.iters = iters
        self.temperature = float(temperature)
        self.eps = 1e-6

    @property
    def iters(self) -> int:
        return self._iters

    @iters.setter
    def iters(self, value: int) -> None:
        # The original leaves the codes undefined with 0 iterations (it crashes); reject it up front.
        if int(value) != value or int(value) < 1:
            raise UserError(f"the low-rank module needs at least 1 iteration (--cluster_iters), got {value}")
        self._iters = int(value)

    def forward(self, views: list[Tensor], init_logits: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        if not views:
            raise ValueError("CVLR needs at least one view")
        b, c = views[0].shape[:2]
        for v in views:
            if v.dim() != 4 or v.shape[0] != b or v.shape[1] != c:
                raise ValueError(f"CVLR: views must all be (B={b}, C={c}, H, W), got {tuple(v.shape)}")
        if c != self.channels:
            raise ValueError(f"CVLR built for {self.channels} channels, got {c}")
        if init_logits.dim() != 4 or init_logits.shape[0] != b or init_logits.shape[-2:] != views[0].shape[-2:]:
            raise ValueError(f"CVLR: init_logits {tuple(init_logits.shape)} must be (B, K) at view 1's size "
                             f"{tuple(views[0].shape[-2:])}")

        flat = [v.flatten(2) for v in views]                          # (B, C, Ni)
        sizes = [f.shape[-1] for f in flat]
        x = torch.cat(flat, dim=2).transpose(1, 2)                    # (B, N, C)

        # class-aware dictionary initialisation, detached (the original detaches logits and D0)
        a0 = init_logits.detach().flatten(2).softmax(dim=1)           # (B, K, N1)
        a0 = a0 / (a0.sum(dim=-1, keepdim=True) + 1e-6)
        d0 = torch.einsum("bkn,bcn->bkc", a0, flat[0].detach().to(a0.dtype)).to(x.dtype)

        xp = self.transform1(x)                                       # (B, N, C)
        d = _l2norm(self.transform1(d0), dim=-1)                      # (B, K, C)
        z = None
        for _ in range(self.iters):
            z = torch.einsum("bkc,bnc->bkn", d, xp).div(self.temperature).softmax(dim=1)   # (B, K, N)
            a = z + self.eps
            a = a / a.sum(dim=-1, keepdim=True)
            d = _l2norm(torch.einsum("bkn,bnc->bkc", a, xp), dim=-1)
        r = F.relu(torch.einsum("bkn,bkc->bnc", z, d))
        out = F.relu(x + self.transform2(r))                          # (B, N, C)

        feats = [o.transpose(1, 2).reshape(v.shape) for o, v in zip(out.split(sizes, dim=1), views)]
        codes = [zz.reshape(b, zz.shape[1], *v.shape[-2:]) for zz, v in zip(z.split(sizes, dim=2), views)]
        return feats, codes, d


# --------------------------------------------------------------------------------------------------------
# GCI and the Stochastic Gate
# --------------------------------------------------------------------------------------------------------
class GCI(nn.Module):
    """Global cue injection (1-stage-wseg's gci.py).

    deep (B, Cd, h, w) -> 1x1 conv (no bias) to 2*out + BN + ReLU -> global max pool -> gamma (first `out`
    channels), beta (last `out`); shallow (B, Cs, H, W) -> 1x1 conv (no bias) to out + BN(affine=False);
    y = ReLU(shallow * (gamma + 1) + beta) -> 1x1 conv (no bias) + BN + ReLU. Output (B, out, H, W).
    NB the original's forward takes (shallow, deep); this one takes (deep, shallow).
    """

    def __init__(self, deep_channels: int = 256, shallow_channels: int = 256, out_channels: int = 256):
        super().__init__()
        self.out_channels = int(out_channels)
        self.fc_deep = nn.Sequential(nn.Conv2d(deep_channels, 2 * out_channels, 1, bias=False),
                                     _bn(2 * out_channels), nn.ReLU())
        self.fc_skip = nn.Sequential(nn.Conv2d(shallow_channels, out_channels, 1, bias=False),
                                     _bn(out_channels, affine=False))
        self.fc_cls = nn.Sequential(nn.Conv2d(out_channels, out_channels, 1, bias=False),
                                    _bn(out_channels), nn.ReLU())
        init_new_layers(self)

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        attrs = self.fc_deep(deep).amax(dim=(2, 3))                   # (B, 2*out)
        gamma = attrs[:, :self.out_channels, None, None]
        beta = attrs[:, self.out_channels:, None, None]
        s = self.fc_skip(shallow)
        return self.fc_cls(F.relu(s * (gamma + 1) + beta))


class StochasticGate(nn.Module):
    """Stochastic gate (1-stage-wseg's sg.py) mixing deep and shallow features of the same shape.

    Training: an independent Bernoulli draw per element (mask of deep's full shape): with probability
    alpha the output is `shallow`, otherwise (deep - alpha * shallow) / (1 - alpha). So E[output] = deep
    (the original's stated property), not the test-time value.
    Eval: (1 - alpha) * deep + alpha * shallow.
    The original builds its {0, 1} mask as (1 - alpha) * dropout(ones), which is 1 only up to rounding; a
    boolean mask here selects exactly.
    """

    def __init__(self, alpha: float = 0.3):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"StochasticGate alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        if deep.shape != shallow.shape:
            raise ValueError(f"StochasticGate: deep {tuple(deep.shape)} and shallow {tuple(shallow.shape)} differ")
        a = self.alpha
        if not self.training:
            return (1 - a) * deep + a * shallow
        take_shallow = torch.rand(deep.shape, device=deep.device) < a
        return torch.where(take_shallow, shallow, (deep - a * shallow) / (1 - a))


# --------------------------------------------------------------------------------------------------------
# Class scores from masks
# --------------------------------------------------------------------------------------------------------
def ngwp_scores(logits: Tensor, masks: Tensor) -> Tensor:
    """Normalised global weighted pooling + focal mask penalty (1-stage-wseg / SLRNet classifier_forward).

    logits s, masks m: (B, K, H, W), index 0 = background. For class c over the N pixels:
      y_c = sum_i m_ci s_ci / (1 + sum_i m_ci) + (1 - mean_i m_ci)^3 * log(0.01 + mean_i m_ci).
    Returns (B, K - 1): background dropped. Nothing is detached (the original keeps the gradient through
    the masks in both terms).
    """
    if logits.shape != masks.shape or logits.dim() != 4:
        raise ValueError(f"ngwp_scores: logits {tuple(logits.shape)} and masks {tuple(masks.shape)} must be "
                         "the same (B, K, H, W)")
    s = logits.flatten(2)
    m = masks.flatten(2)
    pooled = (s * m).sum(-1) / (1.0 + m.sum(-1))
    m_bar = m.mean(-1)
    penalty = (1 - m_bar).pow(3) * torch.log(0.01 + m_bar)
    return (pooled + penalty)[:, 1:]


# --------------------------------------------------------------------------------------------------------
# ASPP
# --------------------------------------------------------------------------------------------------------
class _ASPPBranch(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.atrous_conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                     bias=False)
        self.bn = _bn(cout)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """SLRNet's ASPP (output stride 8): a 1x1 branch, 3x3 atrous branches at `dilations` (12, 24, 36) and an
    image-pooling branch (avg pool, 1x1, BN, ReLU), each `out_channels` wide, all bias-free; concatenated
    (5 * 256 = 1280) -> 1x1 (no bias) + BN + ReLU + Dropout(0.5).

    Every BatchNorm here stays in eval mode, also after `.train()` (the original puts the ASPP's BNs in
    its frozen-statistics list but keeps their affine parameters trainable): the running statistics never
    change (0/1 from scratch), so each BN acts as a learned per-channel affine map.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, dilations: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.aspp1 = _ASPPBranch(in_channels, out_channels, 1, 1)
        for i, d in enumerate(self.dilations, start=2):
            self.add_module(f"aspp{i}", _ASPPBranch(in_channels, out_channels, 3, d))
        self._n_branches = 1 + len(self.dilations)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                             nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                             _bn(out_channels), nn.ReLU())
        self.conv1 = nn.Conv2d((self._n_branches + 1) * out_channels, out_channels, 1, bias=False)
        self.bn1 = _bn(out_channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        init_new_layers(self)
        self.train(self.training)   # BNs in eval mode from construction on, not only after the first .train()

    def train(self, mode: bool = True) -> "ASPP":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        outs = [getattr(self, f"aspp{i}")(x) for i in range(1, self._n_branches + 1)]
        # bilinear (align_corners=True) upsampling of a 1x1 map is a broadcast
        outs.append(self.global_avg_pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.dropout(self.relu(self.bn1(self.conv1(torch.cat(outs, dim=1)))))


# --------------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------------
def init_new_layers(module: nn.Module) -> nn.Module:
    """Initialise newly added layers as the original's init_weights: every Conv2d weight Kaiming-normal
    (PyTorch's kaiming_normal_ defaults: fan_in, gain sqrt(2)); conv biases are left at PyTorch's default,
    as the original leaves them; BatchNorm/GroupNorm weight 1, bias 0 (when affine). nn.Linear layers
    (CVLR's transforms) keep PyTorch's default init. Returns the module."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
