"""Every registered model keeps the model contract (models/__init__.py), on a tiny config of each."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.config import load_config
from semiseg_cli.models import MODELS, build_model
from semiseg_cli.models.maskclip import MaskCLIP, dense_logits, labels

# model.name -> overrides giving a model that runs in a second on a CPU
VOCAB = Path(tempfile.mkdtemp()) / "vocab.txt"  # SimSeg's BERT vocabulary: its special tokens and 3 words
VOCAB.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nphoto\nof\n")
TINY_MODELS = {
    "deeplabv3plus": ["model.backbone=resnet18", "model.head_channels=16"],
    "semivl": ["model.backbone=clip-vit-tiny"],
    "smp": ["model.backbone=resnet10t", "model.arch=FPN"],
    "maskclip": ["model.backbone=clip-vit-tiny"],
    "slrnet": ["method=slrnet", "model.backbone=resnet18", "model.head_channels=16"],
    "simseg": ["method=simseg", "model.backbone=vit_small_patch16_224", "simseg.vit_depth=1", "simseg.vit_width=32",
               "simseg.vit_heads=1", "simseg.text_layers=1", "simseg.text_width=32", "simseg.text_heads=1",
               "simseg.text_mlp=64", f"simseg.vocab={VOCAB}", "simseg.vocab_size=8", "simseg.image_size=48"],
}


def test_every_model_has_a_tiny_config_and_training_free_ones_train_nothing():
    from semiseg_cli.models import TRAINING_FREE

    assert set(TINY_MODELS) == set(MODELS) and TRAINING_FREE <= set(MODELS)
    for name in MODELS:
        cfg = load_config(None, [f"model.name={name}", "train.crop_size=48", *TINY_MODELS[name]])
        trainable = any(p.requires_grad for p in build_model(cfg).parameters())
        assert trainable == (name not in TRAINING_FREE), name


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_at_the_input_size_and_deterministic_in_eval_mode(name):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.name={name}", "train.crop_size=48", *TINY_MODELS[name]])
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (2, cfg["dataset"]["num_classes"], 40, 56) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    if name != "simseg":  # SimSeg: every parameter at the base LR (lr_mult's default 1 for any child)
        assert trainable <= set(cfg["optim"]["lr_mult"]), "trainable children must be optim.lr_mult groups"
    from semiseg_cli.models import OWN_METHOD

    if trainable and name not in OWN_METHOD:  # the SSL methods' models: an FP stream too
        model.train()
        clean, fp = model(x, need_fp=True)
        assert clean.shape == fp.shape == a.shape


def test_maskclip_is_training_free_and_labels_like_a_direct_computation():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=maskclip", "model.backbone=clip-vit-tiny", "train.crop_size=32"])
    model = build_model(cfg)
    assert isinstance(model, MaskCLIP) and not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.encoder.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model.encoder(x)["dense"]  # the mmseg port feeds ImageNet-normalised images
        sim = torch.einsum("bchw,nc->bnhw", dense, model.text)
        want = 100 * F.interpolate(sim, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), want)
        ign = torch.zeros(2, 32, 32, dtype=torch.long)
        ign[0, :4] = 255
        lab = labels(model(x), 0.5, ign)
        conf, arg = want.softmax(1).max(1)
        assert torch.equal(lab, arg.masked_fill((conf < 0.5) | (ign == 255), 255))
        # concepts: the max over each class's rows
        text = F.normalize(torch.randn(9, 32), dim=-1)
        owner = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
        got = dense_logits(model.encoder, text, owner, 6, x)
        s = torch.einsum("bchw,nc->bnhw", model.encoder(x)["dense"], text)
        per_class = torch.stack([s[:, owner == c].max(1).values for c in range(6)], 1)
        torch.testing.assert_close(got, 100 * F.interpolate(per_class, size=(32, 32), mode="bilinear", align_corners=False))
