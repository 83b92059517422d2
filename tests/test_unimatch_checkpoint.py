"""`convert-weights unimatch-checkpoint`: a checkpoint in UniMatch's own key layout (built here from the layout
in specs/checked_against_originals.md, with timm as the ResNet reference) becomes a semiseg checkpoint whose
logits equal a direct computation of UniMatch's DeepLabV3+ from those tensors."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.conftest import run_cli

K, C = 6, 16  # classes, ASPP / fuse width


def unimatch_layout(seed=0) -> dict:
    """`module.`-prefixed keys of UniMatch's DeepLabV3+ (ResNet-18 with the deep stem, head width C)."""
    g = torch.Generator().manual_seed(seed)
    backbone = timm.create_model("resnet18d", pretrained=False, features_only=True, out_indices=(1, 4)).state_dict()
    sd = {f"backbone.{k}": v for k, v in backbone.items()}
    c1, c4 = 64, 512

    def conv_bn(prefix, cin, cout, k):
        sd[f"{prefix}.0.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5
        bn(f"{prefix}.1", cout)

    def bn(prefix, n):
        sd[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(n, generator=g)
        sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(n, generator=g)
        sd[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(n, generator=g)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    conv_bn("head.b0", c4, C, 1)
    for i in (1, 2, 3):
        conv_bn(f"head.b{i}", c4, C, 3)
    sd["head.b4.gap.1.weight"] = torch.randn(C, c4, 1, 1, generator=g) * (2 / c4) ** 0.5
    bn("head.b4.gap.2", C)
    conv_bn("head.project", 5 * C, C, 1)
    conv_bn("reduce", c1, 48, 1)
    sd["fuse.0.weight"] = torch.randn(C, C + 48, 3, 3, generator=g) * (2 / ((C + 48) * 9)) ** 0.5
    bn("fuse.1", C)
    sd["fuse.3.weight"] = torch.randn(C, C, 3, 3, generator=g) * (2 / (C * 9)) ** 0.5
    bn("fuse.4", C)
    sd["classifier.weight"] = torch.randn(K, C, 1, 1, generator=g) * 0.1
    sd["classifier.bias"] = torch.randn(K, generator=g) * 0.1
    return {f"module.{k}": v for k, v in sd.items()}


def direct_logits(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """UniMatch's DeepLabV3+ forward written out from the tensors (eval mode)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    enc = timm.create_model("resnet18d", pretrained=False, features_only=True, out_indices=(1, 4), output_stride=16)
    enc.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})
    enc.eval()

    def cbr(x, conv, bn, dilation=1):
        w = sd[f"{conv}.weight"]
        x = F.conv2d(x, w, padding=dilation * (w.shape[-1] // 2), dilation=dilation)
        x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                         False, 0.0, 1e-5)
        return F.relu(x)

    c1, c4 = enc(x)
    branches = [cbr(c4, "head.b0.0", "head.b0.1")]
    branches += [cbr(c4, f"head.b{i}.0", f"head.b{i}.1", r) for i, r in ((1, 6), (2, 12), (3, 18))]
    pooled = cbr(F.adaptive_avg_pool2d(c4, 1), "head.b4.gap.1", "head.b4.gap.2")
    branches.append(F.interpolate(pooled, size=c4.shape[-2:], mode="bilinear", align_corners=True))
    aspp = cbr(torch.cat(branches, 1), "head.project.0", "head.project.1")
    aspp = F.interpolate(aspp, size=c1.shape[-2:], mode="bilinear", align_corners=True)
    feat = torch.cat([cbr(c1, "reduce.0", "reduce.1"), aspp], 1)
    feat = cbr(cbr(feat, "fuse.0", "fuse.1"), "fuse.3", "fuse.4")
    out = F.conv2d(feat, sd["classifier.weight"], sd["classifier.bias"])
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny-unimatch.yaml"
    path.write_text("method: unimatch\nmodel:\n  backbone: resnet18d\n  head_channels: 16\n  weights: null\n"
                    "dataset:\n  name: synthetic\n")
    return path


def test_a_unimatch_checkpoint_converts_and_predicts_like_unimatchs_model(tmp_path, recipe, synthetic_root):
    sd = unimatch_layout()
    torch.save({"model": sd, "optimizer": {}, "epoch": 3, "previous_best": 41.2}, tmp_path / "best.pth")
    dst = tmp_path / "converted" / "best.pt"
    proc = run_cli("convert-weights", "unimatch-checkpoint", tmp_path / "best.pth", dst, "--recipe", recipe, "-v", check=0)
    assert json.loads(proc.stdout)["keys"] == len(sd)
    assert "module.head.b4.gap.1.weight -> head.aspp.branches.4.conv.0.weight" in proc.stderr

    from semiseg_cli.engine.checkpoint import model_from_checkpoint

    cfg, model = model_from_checkpoint(dst)
    assert cfg["method"] == "unimatch" and cfg["model"]["backbone"] == "resnet18d"
    x = torch.randn(2, 3, 65, 81)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), direct_logits(sd, x), atol=1e-4, rtol=1e-4)
    # eval takes it directly
    proc = run_cli("eval", "--checkpoint", dst, "--set", f"dataset.root={synthetic_root}", "--set", "eval.mode=whole",
                   "--json", check=0)
    assert json.loads(proc.stdout)["num_classes"] == K


def test_a_missing_or_extra_key_is_one_line_naming_it(tmp_path, recipe):
    sd = unimatch_layout()
    missing = dict(sd)
    del missing["module.fuse.4.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    proc = run_cli("convert-weights", "unimatch-checkpoint", tmp_path / "missing.pth", tmp_path / "a.pt", "--recipe", recipe, "-q")
    assert proc.returncode == 2 and "head.fuse.1.1.running_var" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    extra = {**sd, "module.aux_head.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    proc = run_cli("convert-weights", "unimatch-checkpoint", tmp_path / "extra.pth", tmp_path / "b.pt", "--recipe", recipe, "-q")
    assert proc.returncode == 2 and "module.aux_head.weight" in proc.stderr
    proc = run_cli("convert-weights", "unimatch-checkpoint", tmp_path / "extra.pth", tmp_path / "c.pt", "-q")
    assert proc.returncode == 2 and "needs --recipe" in proc.stderr
    proc = run_cli("convert-weights", "torchvision-resnet", tmp_path / "extra.pth", tmp_path / "c.pt", "--recipe", recipe)
    assert proc.returncode == 2 and "--recipe does not apply" in proc.stderr


def test_an_xception65_checkpoint_under_a_recipe_of_another_backbone_is_refused_in_one_line(tmp_path, recipe):
    """UniMatch's Xception-65 is not timm's xception65 under other names (see the converter's docstring): its
    checkpoint converts with the coco recipes (`xception65_unimatch`, tests/test_xception.py), and under a
    recipe of another backbone it is refused, naming the recipe to use, instead of mis-converted."""
    # a few keys in UniMatch's Xception layout (model/backbone/xception.py: blockN.skip / sepconvK.depthwise, conv3..5)
    sd = {f"module.backbone.{k}": torch.zeros(1) for k in
          ("conv1.weight", "block1.skip.weight", "block2.sepconv2.depthwise.weight", "conv5.bn2.running_var")}
    sd.update({k: v for k, v in unimatch_layout().items() if not k.startswith("module.backbone.")})
    torch.save({"model": sd}, tmp_path / "coco.pth")
    for sets in ([], ["--set", "model.backbone=xception65"]):
        proc = run_cli("convert-weights", "unimatch-checkpoint", tmp_path / "coco.pth", tmp_path / "x.pt",
                       "--recipe", recipe if not sets else "unimatch-coco-1_32", *sets, "-q")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "xception65_unimatch" in lines[0] and "not timm's xception65" in lines[0]
        assert not (tmp_path / "x.pt").exists()
