"""segmentation-models-pytorch (smp) architectures on any timm encoder: `model.name: smp`.

`model.arch` picks the decoder (Unet, UnetPlusPlus, FPN, PSPNet, DeepLabV3, DeepLabV3Plus, Linknet, MAnet,
PAN, UPerNet, Segformer) and `model.backbone` the encoder, built through smp's timm universal encoder
(`tu-<timm name>`), so every timm model with `features_only` works and a `semiseg convert-weights` file
made for the same timm backbone loads into it. Weights are always random or converted: smp never
downloads (`encoder_weights=None`). smp's own defaults are kept for each decoder (e.g. DeepLabV3 at
output stride 8, DeepLabV3Plus and PAN at 16); model.output_stride and model.head_channels only apply to
deeplabv3plus. DPT is left out: it needs a ViT encoder (its own TimmViTEncoder with prefix tokens),
not the timm universal encoder every other arch uses.

The smp model is taken apart into the two children the optimiser gives their own LR: `backbone` (the
encoder) and `head` (decoder + segmentation head). That split is also what the UniMatch feature
perturbation needs: with `need_fp=True` the encoder runs once, every encoder feature map is decoded
together with a copy passed through Dropout2d(0.5) (the batch doubled, as in UniMatch's DeepLabV3+), and
the two halves are the clean and the perturbed logits.

Example:
    >>> model = SmpModel("FPN", "resnet18", num_classes=21)
    >>> model(torch.zeros(1, 3, 50, 70)).shape
    torch.Size([1, 21, 50, 70])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semiseg_cli.errors import UserError, did_you_mean

# arch -> (H and W must be multiples of this, and at least this big). The multiple is the encoder's
# output stride in smp's defaults (PSPNet uses 3 encoder stages, DeepLabV3 dilates to stride 8);
# PAN's pyramid attention pools its stride-16 map three more times, so it needs at least 128 pixels.
# config.py keeps a copy of the names (CHOICES["model.arch"]) so that reading a config never imports torch.
ARCHS = {
    "Unet": (32, 32), "UnetPlusPlus": (32, 32), "FPN": (32, 32), "PSPNet": (8, 8), "DeepLabV3": (8, 8),
    "DeepLabV3Plus": (16, 16), "Linknet": (32, 32), "MAnet": (32, 32), "PAN": (16, 128), "UPerNet": (32, 32),
    "Segformer": (32, 32),
}


def _padded(size: int, multiple: int, minimum: int) -> int:
    return max(-(-size // multiple) * multiple, minimum)


class SmpHead(nn.Module):
    """An smp decoder and its segmentation head: encoder features -> logits at the (padded) input size."""

    def __init__(self, decoder: nn.Module, segmentation_head: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.segmentation_head = segmentation_head

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.segmentation_head(self.decoder(features))


class SmpModel(nn.Module):
    """An smp architecture with the model contract: any input size, logits [B, K, H, W], need_fp.

    Args:
        arch: one of ARCHS, e.g. "Unet".
        backbone: timm model name, e.g. "resnet18", "efficientnet_lite0", "resnet101s".
        num_classes: K.
    """

    def __init__(self, arch: str, backbone: str, num_classes: int):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"model.arch = {arch!r} is not an smp architecture{did_you_mean(arch, ARCHS)}; "
                            f"choose one of: {', '.join(ARCHS)}")
        import segmentation_models_pytorch as smp

        from semiseg_cli.models import timm_name_errors

        with timm_name_errors(backbone):
            net = smp.create_model(arch, encoder_name=f"tu-{backbone}", encoder_weights=None, classes=num_classes)
        self.multiple, self.min_size = ARCHS[arch]
        self.backbone = net.encoder
        self.head = SmpHead(net.decoder, net.segmentation_head)
        self.fp_dropout = nn.Dropout2d(0.5)

    @property
    def timm_model(self) -> nn.Module:
        """The timm features_only model inside smp's encoder: what a converted weights file fits. A
        property, not a child, so that it adds no parameter group."""
        return self.backbone.model

    def forward(self, x: torch.Tensor, need_fp: bool = False):
        """Logits [B, K, H, W]; with need_fp the tuple (clean, feature-perturbed) logits."""
        h, w = x.shape[-2:]
        # zero padding bottom/right = the ImageNet mean colour; the padded logits are cropped off
        ph, pw = _padded(h, self.multiple, self.min_size) - h, _padded(w, self.multiple, self.min_size) - w
        x = F.pad(x, (0, pw, 0, ph))
        features = self.backbone(x)
        if need_fp:
            # smp passes the input image itself as the first "feature"; it is not an encoder feature, so it
            # is not dropped (decoders that use it see the same image in both halves)
            features = [torch.cat([f, f if f is x else self.fp_dropout(f)]) for f in features]
        logits = self.head(features)[..., :h, :w]
        return logits.chunk(2) if need_fp else logits


def build_smp(cfg: dict) -> nn.Module:
    """SmpModel(model.arch, model.backbone) with model.weights (a converted timm backbone) loaded."""
    from semiseg_cli.models import convert_hint, load_backbone_weights

    m = cfg["model"]
    model = SmpModel(m["arch"], m["backbone"], cfg["dataset"]["num_classes"])
    if m["weights"]:
        load_backbone_weights(model, m["weights"], convert_hint(m["backbone"], m["weights"]), part="timm_model")
    return model
