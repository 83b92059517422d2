"""SLRNet (Pan et al., "Learning Self-supervised Low-Rank Network for Single-Stage Weakly and Semi-supervised
Semantic Segmentation", IJCV 2022, arXiv 2203.10278; specs/slrnet_s4mc.md part A).

Encoder: WideResNet-38 (`model.backbone: wideresnet38`, models/wideresnet38.py: conv3 at stride 4, conv6 at
stride 8) or any timm encoder's stride-4 feature and its last feature dilated to model.output_stride (8 as
WideResNet-38; the CPU recipes: 16).
Head (`head`, every new layer; the 1/2/10/20 LR groups come from optim.lr_mult and optim.bias_lr_factor):
ASPP on the deep feature (BN in eval mode), fused with the stride-4 skip into X (256 ch at stride 4); an aux
head on X whose softmax initialises CVLR's K = num_classes bases; CVLR factorises X of both views with one
shared dictionary (models/slrnet_layers.py); the segmentation branch (GCI, stochastic gate, last_conv) gives
foreground logits, with a constant background logit 1 (the aux head: 1 - max) unless the background is
predicted (slrnet.variant semi_nocls: K real logits, no class scores); class scores by nGWP with the focal
penalty.

Calls:
    model(x)         one view: log-probabilities [B, K, H, W] at x's size (the model contract's logits: their
                     softmax is the masks); with_scores=True: (class scores [B, K-1], masks), SLRNet's inference
    model(x, x2)     two views (training; x2 = x resized by slrnet.view_scale): a dict of every output the
                     losses need, view 2's maps upsampled to view 1's feature size (methods/slrnet.py)
    model.aggregate(x, eval_cfg, labels)   SLRNet's inference (`tools/infer_voc.py`): scales and flip averaged
                     (masks and class scores), the image-label rule, bg_pow; returns probabilities that are
                     not renormalised (what its CRF and argmax see). `engine/evaluate.predict` calls it.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.models.slrnet_layers import ASPP, CVLR, GCI, StochasticGate, init_new_layers, ngwp_scores

BN_MOMENTUM = 0.05  # the head's BatchNorms (SLRNet's single_stage.py)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM, eps=1e-5)


def build_encoder(name: str, output_stride: int = 8, deep_stage: int = -1) -> tuple[nn.Module, tuple[int, int]]:
    """The encoder and its (shallow, deep) channels: forward -> (stride-4 feature, deep feature). A timm encoder
    gives its stride-4 feature and its last feature, dilated to `output_stride` (8 = WideResNet-38's conv6; the
    CPU recipes take 16, a quarter of the deep stages' cost: the head upsamples it to stride 4 anyway), or with
    `deep_stage` another stage's (2: the stride-8 stage, whose smaller receptive field keeps the class logits of
    small images local)."""
    if name == "wideresnet38":
        from semiseg_cli.models.wideresnet38 import WideResNet38

        encoder = WideResNet38()
        return encoder, tuple(encoder.out_channels)
    encoder = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, deep_stage),
                                output_stride=output_stride)
    return encoder, tuple(encoder.feature_info.channels())


class SLRNetHead(nn.Module):
    """Every layer SLRNet adds to its encoder (names follow the original's, so its checkpoints map by prefix)."""

    def __init__(self, shallow: int, deep: int, num_out: int, channels: int = 256, cvlr_iters: int = 1):
        super().__init__()
        self.aspp = ASPP(deep, channels)
        self.fc8_skip = nn.Sequential(nn.Conv2d(shallow, 48, 1, bias=False), _bn(48), nn.ReLU())
        self.fc8_x = nn.Sequential(nn.Conv2d(channels + 48, channels, 3, padding=1, bias=False), _bn(channels), nn.ReLU())
        self.aux_head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), _bn(channels), nn.ReLU(),
                                      nn.Dropout(0.5), nn.Conv2d(channels, num_out, 1))
        self.cvlr = CVLR(channels, cvlr_iters)
        self.shallow_mask = GCI(channels, shallow, channels)
        self.sg = StochasticGate(0.3)
        self.last_conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _bn(channels), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _bn(channels), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(channels, num_out, 1))
        init_new_layers(self)


class SLRNet(nn.Module):
    """SLRNet; see the module docstring.

    Args:
        backbone: "wideresnet38" or a timm encoder name.
        output_stride: a timm encoder's deep-feature stride (WideResNet-38's is 8).
        deep_stage: the timm encoder stage giving the deep feature (-1: the last).
        num_classes: K, background included.
        predict_background: K real logits (semi without image labels) instead of K - 1 and a constant one.
        channels: head width (256 in the paper).
        cvlr_iters: CVLR's T.
    """

    def __init__(self, backbone: str, num_classes: int, predict_background: bool = False, channels: int = 256,
                 cvlr_iters: int = 1, output_stride: int = 8, deep_stage: int = -1):
        super().__init__()
        self.num_classes, self.predict_background = num_classes, predict_background
        self.backbone, (shallow, deep) = build_encoder(backbone, output_stride, deep_stage)
        self.head = SLRNetHead(shallow, deep, num_classes if predict_background else num_classes - 1, channels,
                               cvlr_iters)

    # --- pieces (called from forward only) ---
    def _features(self, x):
        """X (the fused stride-4 feature CVLR factorises) and the encoder's stride-4 feature."""
        h = self.head
        shallow, deep = self.backbone(x)
        x = h.aspp(deep)
        skip = h.fc8_skip(shallow)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return h.fc8_x(torch.cat([x, skip], 1)), shallow

    def _with_background(self, fg: torch.Tensor, aux: bool) -> torch.Tensor:
        if self.predict_background:
            return fg
        bg = 1 - fg.max(1, keepdim=True)[0] if aux else torch.ones_like(fg[:, :1])
        return torch.cat([bg, fg], 1)

    def _segment(self, x, shallow):
        h = self.head
        x = h.sg(x, h.shallow_mask(x, shallow))
        logits = self._with_background(h.last_conv(x), aux=False)
        return logits, logits.softmax(1)

    def _scores(self, logits, masks):
        if self.predict_background:  # no classification branch: every class "present" (sigmoid(1) = 0.73)
            return logits.new_ones(logits.shape[0], self.num_classes - 1)
        return ngwp_scores(logits, masks)

    def forward(self, x: torch.Tensor, x2: torch.Tensor | None = None, with_scores: bool = False):
        size = x.shape[-2:]
        if x2 is None:
            f, shallow = self._features(x)
            aux = self._with_background(self.head.aux_head(f), aux=True)
            (f,), _, _ = self.head.cvlr([f], aux)
            logits, masks = self._segment(f, shallow)
            up = F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
            if with_scores:
                return self._scores(logits, masks), up
            return up.clamp(min=1e-8).log()  # the model contract's logits: log-probabilities of the masks
        f1, s1 = self._features(x)
        f2, s2 = self._features(x2)
        aux = self._with_background(self.head.aux_head(f1), aux=True)
        (f1, f2), (z1, z2), _ = self.head.cvlr([f1, f2], aux)
        logits1, masks1 = self._segment(f1, s1)
        logits2, masks2 = self._segment(f2, s2)
        up = f1.shape[-2:]

        def to_view1(t):  # view 2's maps back on view 1's grid (the original's inverse transform)
            return F.interpolate(t, size=up, mode="bilinear", align_corners=True)

        aux_masks = aux.softmax(1)
        return {"logits1": logits1, "masks1": masks1, "cls1": self._scores(logits1, masks1),
                "logits2": to_view1(logits2), "masks2": to_view1(masks2), "cls2": self._scores(logits2, masks2),
                "aux_logits": aux, "aux_masks": aux_masks, "cls_aux": self._scores(aux, aux_masks),
                "codes1": z1, "codes2": to_view1(z2)}

    @torch.no_grad()
    def aggregate(self, x: torch.Tensor, ev: dict, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, K, H, W] at x's size as SLRNet's `infer_voc.py` makes them: for each of
        ev["scales"] the image resized (bicubic; the original resizes with PIL) and, with ev["flip"], its mirror;
        masks upsampled (bilinear, align_corners) and averaged, class scores averaged; foreground channels
        multiplied by `labels` [B, K-1] (ev["image_labels"] given) or by the predicted labels (sigmoid > fp_cut
        and >= the topk_classes-th largest); background ** bg_pow; not renormalised."""
        h, w = x.shape[-2:]
        masks, scores, n = 0, 0, 0
        for s in ev["scales"]:
            img = x if s == 1 else F.interpolate(x, size=(round(h * s), round(w * s)), mode="bicubic", align_corners=False)
            variants = [img, img.flip(-1)] if ev["flip"] else [img]
            cls, m = self(torch.cat(variants), with_scores=True)
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)
            for i, (c, mv) in enumerate(zip(cls.chunk(len(variants)), m.chunk(len(variants)))):
                masks = masks + (mv.flip(-1) if i else mv)
                scores = scores + c
                n += 1
        masks, scores = masks / n, scores / n
        if labels is None:
            labels = predicted_labels(scores, ev["fp_cut"], ev["topk_classes"])
        return restrict_to_labels(masks, labels, ev["bg_pow"])


def predicted_labels(scores: torch.Tensor, fp_cut: float = 0.3, topk: int = 6) -> torch.Tensor:
    """SLRNet's predicted image labels [B, K-1] (`--use_cls_label 0`): sigmoid(score) > fp_cut and >= the topk-th
    largest sigmoid (ties at the topk-th all kept)."""
    p = scores.float().sigmoid()
    kth = p.topk(min(topk, p.shape[1]), dim=1)[0][:, -1:]
    return (p > fp_cut) & (p >= kth)


def restrict_to_labels(masks: torch.Tensor, labels: torch.Tensor, bg_pow: float = 1.0) -> torch.Tensor:
    """Foreground channels of classes not in `labels` [B, K-1] zeroed, background ** bg_pow, and no
    renormalisation (the original's CRF and argmax see these values)."""
    out = masks.clone()
    out[:, 1:] *= labels.to(masks.dtype)[:, :, None, None]
    out[:, 0] = out[:, 0] ** bg_pow
    return out


def build_slrnet(cfg: dict) -> nn.Module:
    from semiseg_cli.models import convert_hint, load_backbone_weights, make_packaged_weights, timm_name_errors

    m = cfg["model"]
    with timm_name_errors(m["backbone"]):
        model = SLRNet(m["backbone"], cfg["dataset"]["num_classes"], cfg["slrnet"]["variant"] == "semi_nocls",
                       m["head_channels"], m["cvlr_iters"], m["output_stride"], m["deep_stage"])
    if m["weights"]:
        make_packaged_weights(m["backbone"], m["weights"])
        load_backbone_weights(model, m["weights"], convert_hint(m["backbone"], m["weights"]))
    return model
