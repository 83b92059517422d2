"""SLRNet's building blocks (semiseg_cli/models/slrnet_layers.py) checked against their formulas
(specs/slrnet_s4mc.md part A, specs/checked_against_originals.md "SLRNet"), written out here directly:
per-pixel loops for PAMR, einsum for CVLR, hand numbers for nGWP."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.errors import UserError
from semiseg_cli.models.slrnet_layers import (ASPP, CVLR, GCI, StochasticGate, init_new_layers, ngwp_scores,
                                              pamr)


# ------------------------------------------------------------------------------------------------ PAMR
def _pamr_loop(image, masks, iters, dilations):
    """Per-pixel reference: replicate padding = clamped coordinates; sigma = sample std (n-1) over the 3x3
    window incl. the centre at every dilation; softmax over the 8*len(dilations) non-centre neighbours."""
    img, m = image[0].tolist(), masks[0].tolist()
    C, K, H, W = len(img), len(m), len(img[0]), len(img[0][0])

    def at(t, c, i, j):
        return t[c][min(max(i, 0), H - 1)][min(max(j, 0), W - 1)]

    taps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    nbrs = [(dy * d, dx * d) for d in dilations for dy, dx in taps if (dy, dx) != (0, 0)]
    aff = {}
    for i in range(H):
        for j in range(W):
            sig = [statistics.stdev([at(img, c, i + dy * d, j + dx * d) for d in dilations for dy, dx in taps])
                   for c in range(C)]
            logits = [sum(-abs(img[c][i][j] - at(img, c, i + oy, j + ox)) / (1e-8 + 0.1 * sig[c])
                          for c in range(C)) / C for oy, ox in nbrs]
            mx = max(logits)
            e = [math.exp(v - mx) for v in logits]
            aff[i, j] = [v / sum(e) for v in e]
    for _ in range(iters):
        m = [[[sum(a * at(m, k, i + oy, j + ox) for a, (oy, ox) in zip(aff[i, j], nbrs)) for j in range(W)]
              for i in range(H)] for k in range(K)]
    return torch.tensor([m], dtype=torch.float64)


@pytest.mark.parametrize("dilations", [(1, 2), (3, 8)])   # (3, 8): offsets beyond the 7x9 image
def test_pamr_matches_per_pixel_loop(dilations):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 7, 9, generator=g, dtype=torch.float64)
    image[:, :, :2, :3] = 0.5                                     # a flat patch (small sigma)
    masks = torch.rand(1, 3, 7, 9, generator=g, dtype=torch.float64).softmax(1)
    got = pamr(image, masks, iters=2, dilations=dilations)
    ref = _pamr_loop(image, masks, 2, dilations)
    assert got.shape == (1, 3, 7, 9) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_pamr_dtypes_layouts_and_zero_iters():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 10, 12, generator=g)
    masks = torch.rand(2, 4, 10, 12, generator=g).softmax(1)
    ref = pamr(image, masks, iters=3)
    assert torch.isfinite(ref).all()
    # affinity rows sum to 1, so the masks stay a distribution over K
    torch.testing.assert_close(ref.sum(1), torch.ones(2, 10, 12))
    cl = pamr(image.to(memory_format=torch.channels_last), masks.to(memory_format=torch.channels_last), iters=3)
    torch.testing.assert_close(cl, ref)
    half = pamr(image.half(), masks.half(), iters=3)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=2e-3, rtol=0)
    flat = pamr(torch.zeros(1, 3, 5, 5), masks[:1, :, :5, :5], iters=1)   # sigma = 0 everywhere
    assert torch.isfinite(flat).all()
    torch.testing.assert_close(pamr(image, masks, iters=0), masks)
    with pytest.raises(ValueError):
        pamr(image[:, :, :5], masks)


# ------------------------------------------------------------------------------------------------ CVLR
def _l2n(x, dim):
    return x / (1e-6 + x.norm(dim=dim, keepdim=True))


def _cvlr_ref(cvlr, xs, logits, detach_init=True):
    """CVLR for T = 1 written out with einsum; channel-first (B, C, N) throughout."""
    W1, b1 = cvlr.transform1.weight, cvlr.transform1.bias
    W2, b2 = cvlr.transform2.weight, cvlr.transform2.bias
    B, C = xs[0].shape[:2]
    flat = [x.reshape(B, C, -1) for x in xs]
    X = torch.cat(flat, -1)
    X1 = flat[0].detach() if detach_init else flat[0]
    L = logits.detach() if detach_init else logits
    A0 = L.reshape(B, L.shape[1], -1).softmax(1)
    A0 = A0 / (A0.sum(-1, keepdim=True) + 1e-6)
    D0 = torch.einsum("bcn,bkn->bkc", X1, A0)
    Xp = torch.einsum("oc,bcn->bon", W1, X) + b1[None, :, None]
    D = _l2n(torch.einsum("oc,bkc->bko", W1, D0) + b1, -1)
    Z = torch.einsum("bkc,bcn->bkn", D, Xp).softmax(1)
    A = (Z + 1e-6) / (Z + 1e-6).sum(-1, keepdim=True)
    D = _l2n(torch.einsum("bkn,bcn->bkc", A, Xp), -1)
    R = F.relu(torch.einsum("bkn,bkc->bcn", Z, D))
    out = F.relu(X + torch.einsum("oc,bcn->bon", W2, R) + b2[None, :, None])
    sizes = [f.shape[-1] for f in flat]
    feats = [o.reshape(x.shape) for o, x in zip(out.split(sizes, -1), xs)]
    codes = [z.reshape(B, -1, *x.shape[-2:]) for z, x in zip(Z.split(sizes, -1), xs)]
    return feats, codes, D


def _cvlr_inputs(seed=0, B=2, C=8, K=4):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, C, 4, 5, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, C, 2, 3, generator=g, dtype=torch.float64)
    logits = 3 * torch.randn(B, K, 4, 5, generator=g, dtype=torch.float64)
    return x1, x2, logits


def test_cvlr_two_views_equals_einsum_reference():
    torch.manual_seed(0)
    cvlr = CVLR(channels=8).double()
    x1, x2, logits = _cvlr_inputs()
    feats, codes, bases = cvlr([x1, x2], logits)
    with torch.no_grad():
        rf, rc, rb = _cvlr_ref(cvlr, [x1, x2], logits)
    assert [f.shape for f in feats] == [x1.shape, x2.shape]
    assert [c.shape for c in codes] == [(2, 4, 4, 5), (2, 4, 2, 3)]
    assert bases.shape == (2, 4, 8)
    for a, b in zip(feats + codes + [bases], rf + rc + [rb]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_cvlr_codes_bases_and_one_view():
    torch.manual_seed(0)
    cvlr = CVLR(channels=8)
    x1, x2, logits = (t.float() for t in _cvlr_inputs(1))
    for views in ([x1], [x1, x2]):
        feats, codes, bases = cvlr(views, logits)
        assert [f.shape for f in feats] == [v.shape for v in views]
        assert [c.shape[-2:] for c in codes] == [v.shape[-2:] for v in views]
        for c in codes:
            torch.testing.assert_close(c.sum(1), torch.ones_like(c[:, 0]))
        torch.testing.assert_close(bases.norm(dim=-1), torch.ones(2, 4), atol=1e-5, rtol=0)
        assert all((f >= 0).all() for f in feats)                       # final ReLU
    # bases per image: a batch of 2 equals each image alone
    feats, codes, bases = cvlr([x1, x2], logits)
    f0, c0, b0 = cvlr([x1[1:], x2[1:]], logits[1:])
    torch.testing.assert_close(feats[1][1:], f0[1])
    torch.testing.assert_close(codes[0][1:], c0[0])
    torch.testing.assert_close(bases[1:], b0)
    # iters settable; more iterations still give normalised codes / bases; 0 is refused
    cvlr.iters = 3
    _, codes, bases = cvlr([x1, x2], logits)
    torch.testing.assert_close(codes[1].sum(1), torch.ones_like(codes[1][:, 0]))
    torch.testing.assert_close(bases.norm(dim=-1), torch.ones(2, 4), atol=1e-5, rtol=0)
    with pytest.raises(UserError):
        cvlr.iters = 0


def test_cvlr_no_gradient_through_initialisation():
    torch.manual_seed(0)
    cvlr = CVLR(channels=8).double()
    x1, x2, logits = _cvlr_inputs(2)
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x1, x2, x1[:, :4], x2[:, :4])]

    def grads(fn, detach_init=True):
        a, b, lg = (t.clone().requires_grad_(True) for t in (x1, x2, logits))
        feats, codes, _ = fn([a, b], lg, detach_init)
        loss = sum((t * ww).sum() for t, ww in zip(feats + codes, w))
        loss.backward()
        return a.grad, b.grad, lg.grad

    ga, gb, gl = grads(lambda v, lg, _: cvlr(v, lg))
    assert gl is None                                                   # logits detached
    ra, rb, _ = grads(lambda v, lg, d: _cvlr_ref(cvlr, v, lg, d))
    torch.testing.assert_close(ga, ra)                                  # only the X and W1 X paths
    torch.testing.assert_close(gb, rb)
    na, _, nl = grads(lambda v, lg, d: _cvlr_ref(cvlr, v, lg, d), detach_init=False)
    assert nl.abs().max() > 0 and not torch.allclose(na, ga)            # the check above can fail


# ----------------------------------------------------------------------------------- GCI and the gate
def test_gci_formula_eval_mode():
    torch.manual_seed(0)
    gci = GCI(deep_channels=6, shallow_channels=5, out_channels=4)
    bns = [m for m in gci.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 and all(bn.momentum == 0.05 and bn.eps == 1e-5 for bn in bns)
    assert not gci.fc_skip[1].affine
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    gci.eval()
    deep, shallow = torch.randn(2, 6, 3, 3), torch.randn(2, 5, 7, 7)

    def bn(x, m):
        y = (x - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + 1e-5)
        return y * m.weight[:, None, None] + m.bias[:, None, None] if m.affine else y

    def conv1x1(x, conv):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)

    with torch.no_grad():
        y = F.relu(bn(conv1x1(deep, gci.fc_deep[0]), gci.fc_deep[1])).amax((2, 3))     # (2, 8)
        gamma, beta = y[:, :4, None, None], y[:, 4:, None, None]
        s = bn(conv1x1(shallow, gci.fc_skip[0]), gci.fc_skip[1])
        ref = F.relu(bn(conv1x1(F.relu(s * (gamma + 1) + beta), gci.fc_cls[0]), gci.fc_cls[1]))
        torch.testing.assert_close(gci(deep, shallow), ref)


def test_stochastic_gate():
    gate = StochasticGate(alpha=0.3)
    g = torch.Generator().manual_seed(0)
    deep, shallow = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    gate.eval()
    assert torch.equal(gate(deep, shallow), 0.7 * deep + 0.3 * shallow)
    gate.train()
    torch.manual_seed(0)
    # per element: shallow with probability alpha, else (deep - alpha*shallow)/(1 - alpha)
    d, s = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
    out = gate(d, s)
    chose_s = out == s
    other = (d - 0.3 * s) / 0.7
    assert torch.equal(out[~chose_s], other[~chose_s])
    assert abs(chose_s.float().mean().item() - 0.3) < 0.01
    assert 0.25 < chose_s.float().mean((1, 2)).min()                    # per element, not per channel
    # the expectation over masks is the deep input (the original's E[x] = x1), not the eval value
    n = 4000
    mean = gate(deep[:1].expand(n, -1, -1, -1), shallow[:1].expand(n, -1, -1, -1)).mean(0)
    sd = (0.21 ** 0.5) * (shallow[0] - (deep[0] - 0.3 * shallow[0]) / 0.7).abs() / n ** 0.5
    assert ((mean - deep[0]).abs() <= 5 * sd + 1e-6).all()
    assert (mean - (0.7 * deep[0] + 0.3 * shallow[0])).abs().max() > 0.1
    with pytest.raises(ValueError):
        StochasticGate(alpha=1.0)


# ------------------------------------------------------------------------------------------------ nGWP
def test_ngwp_scores_hand_example():
    logits = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]],
                            [[2.0, 0.0], [1.0, -1.0]],
                            [[0.0, 3.0], [-2.0, 1.0]]]])
    masks = torch.tensor([[[[0.5, 0.2], [0.1, 0.4]],
                           [[0.25, 0.7], [0.3, 0.1]],
                           [[0.25, 0.1], [0.6, 0.5]]]], requires_grad=True)
    y = ngwp_scores(logits, masks)
    c1 = 0.7 / 2.35 + 0.6625 ** 3 * math.log(0.01 + 0.3375)
    c2 = -0.4 / 2.45 + 0.6375 ** 3 * math.log(0.01 + 0.3625)
    assert y.shape == (1, 2)
    torch.testing.assert_close(y, torch.tensor([[c1, c2]]))
    y.sum().backward()                                                  # masks are not detached
    assert masks.grad[:, 1:].abs().min() > 0 and (masks.grad[:, 0] == 0).all()


# ------------------------------------------------------------------------------------------------ ASPP
def test_aspp_batchnorms_frozen_in_train_mode():
    torch.manual_seed(0)
    aspp = ASPP(in_channels=6, out_channels=4)
    assert [getattr(aspp, f"aspp{i}").atrous_conv.dilation[0] for i in (1, 2, 3, 4)] == [1, 12, 24, 36]
    assert aspp.aspp1.atrous_conv.kernel_size == (1, 1) and aspp.conv1.in_channels == 20
    wrapper = nn.Sequential(aspp)
    wrapper.train()
    bns = [m for m in aspp.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not bn.training for bn in bns)
    assert aspp.training and aspp.dropout.training
    before = {k: v.clone() for k, v in aspp.state_dict().items() if "running" in k or "num_batches" in k}
    out = aspp(torch.randn(2, 6, 5, 5))
    assert out.shape == (2, 4, 5, 5)
    out.sum().backward()
    after = aspp.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(bn.weight.grad is not None for bn in bns)                # affine params still train
    wrapper.eval()
    assert all(not bn.training for bn in bns) and not aspp.training


def test_init_new_layers_leaves_linear_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64), nn.Linear(64, 64))
    nn.init.uniform_(net[1].weight)
    nn.init.uniform_(net[1].bias)
    lin = net[2].weight.clone()
    assert init_new_layers(net) is net
    assert torch.equal(net[2].weight, lin)
    assert torch.equal(net[1].weight, torch.ones(64)) and torch.equal(net[1].bias, torch.zeros(64))
    assert abs(net[0].weight.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.05
