"""SLRNet's WideResNet-38 backbone (models/wideresnet38.py) and `convert-weights wideresnet38` (the ImageNet file
in PSA's naming). The real architecture (~105M parameters) is built at most twice and run on 64x64 inputs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.models.wideresnet38 import NUM_TENSORS, WideResNet38

# The network as PSA / SLRNet define it, written here independently of the module:
# (name, in, mid, out, stride, first-conv dilation, dilation, bottleneck); a shortcut conv where the shape changes
UNITS = [("b2", 64, 128, 128, 2, 1, 1, False), ("b2_1", 128, 128, 128, 1, 1, 1, False),
         ("b2_2", 128, 128, 128, 1, 1, 1, False),
         ("b3", 128, 256, 256, 2, 1, 1, False), ("b3_1", 256, 256, 256, 1, 1, 1, False),
         ("b3_2", 256, 256, 256, 1, 1, 1, False),
         ("b4", 256, 512, 512, 2, 1, 1, False)] + [(f"b4_{i}", 512, 512, 512, 1, 1, 1, False) for i in range(1, 6)] + \
        [("b5", 512, 512, 1024, 1, 1, 2, False), ("b5_1", 1024, 512, 1024, 1, 2, 2, False),
         ("b5_2", 1024, 512, 1024, 1, 2, 2, False),
         ("b6", 1024, None, 2048, 1, 4, 4, True), ("b7", 2048, None, 4096, 1, 4, 4, True)]


def reference_forward(sd: dict, x: torch.Tensor):
    """(conv3, conv6) computed with plain functional ops from a state dict in PSA's names (dropout off)."""
    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    x = F.conv2d(x, sd["conv1a.weight"], padding=1)
    conv3 = None
    for name, cin, _, cout, stride, d1, d, bottleneck in UNITS:
        pre = F.relu(bn(x, f"{name}.bn_branch2a"))
        has_shortcut = cin != cout or stride != 1
        assert (f"{name}.conv_branch1.weight" in sd) == has_shortcut
        short = F.conv2d(pre, sd[f"{name}.conv_branch1.weight"], stride=stride) if has_shortcut else x
        if bottleneck:
            y = F.conv2d(pre, sd[f"{name}.conv_branch2a.weight"])
            y = F.conv2d(F.relu(bn(y, f"{name}.bn_branch2b1")), sd[f"{name}.conv_branch2b1.weight"], padding=d,
                         dilation=d)
            y = F.conv2d(F.relu(bn(y, f"{name}.bn_branch2b2")), sd[f"{name}.conv_branch2b2.weight"])
        else:
            y = F.conv2d(pre, sd[f"{name}.conv_branch2a.weight"], stride=stride, padding=d1, dilation=d1)
            y = F.conv2d(F.relu(bn(y, f"{name}.bn_branch2b1")), sd[f"{name}.conv_branch2b1.weight"], padding=d,
                         dilation=d)
        x = short + y
        if name == "b3_2":
            conv3 = x
    return conv3, F.relu(bn(x, "bn7"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A WideResNet38 with random weights and BN statistics, and its weights saved as PSA's file would be
    (no num_batches_tracked) behind a DataParallel `module.` prefix, with a 1000-class classifier added."""
    torch.manual_seed(0)
    net = WideResNet38()
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == NUM_TENSORS
    path = tmp_path_factory.mktemp("wrn38") / "ilsvrc-cls_rna-a1_cls1000_ep-0001.pth"
    torch.save({**{f"module.{k}": v for k, v in sd.items()}, "module.fc8.weight": torch.randn(1000, 4096, 1, 1),
                "module.fc8.bias": torch.zeros(1000)}, path)
    return net, path


def test_the_converted_file_computes_the_reference_function(source, semiseg, tmp_path):
    _, src = source
    dst = tmp_path / "wideresnet38.pt"
    code, out, err = semiseg("convert-weights", "wideresnet38", src, dst, "-v")
    assert code == 0, err
    assert json.loads(out)["backbone"] == "wideresnet38"
    assert "  module.b4_5.conv_branch2b1.weight -> b4_5.conv_branch2b1.weight" in err
    assert any(line.startswith("  module.fc8.weight -> (dropped: ImageNet classifier") for line in err)
    assert f"{NUM_TENSORS + 2} source keys: {NUM_TENSORS} mapped, 2 dropped" in err[-1]
    assert "keys of wideresnet38)" in err[-1]

    model = WideResNet38()
    model.load_state_dict(torch.load(dst, weights_only=True), strict=True)  # num_batches_tracked filled in
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    sd = {k.removeprefix("module."): v for k, v in torch.load(src, weights_only=True).items()}
    with torch.no_grad():
        conv3, conv6 = model(x)
        ref3, ref6 = reference_forward(sd, x)
    assert conv3.shape == (1, 256, 16, 16) and conv6.shape == (1, 4096, 8, 8)
    assert (model.out_channels, model.strides) == ((256, 4096), (4, 8))
    for got, want in ((conv3, ref3), (conv6, ref6)):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_a_renamed_key_is_named(source, semiseg, tmp_path):
    net, _ = source
    # shapes are all the converter checks before failing: zero-stride tensors keep the file tiny
    sd = {k: torch.zeros(()).expand(v.shape) for k, v in net.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    sd["b5_1.bn_branch2b1.runing_var"] = sd.pop("b5_1.bn_branch2b1.running_var")
    torch.save(sd, tmp_path / "bad.pth")
    code, _, err = semiseg("convert-weights", "wideresnet38", tmp_path / "bad.pth", tmp_path / "x.pt")
    assert code == 2 and len(err) == 1
    assert "b5_1.bn_branch2b1.runing_var" in err[0] and "b5_1.bn_branch2b1.running_var" in err[0]
    assert not (tmp_path / "x.pt").exists()


def test_batchnorms_stay_fixed_and_early_layers_frozen(source):
    net, _ = source
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    net.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 37 and not any(m.training for m in bns)
    assert net.b6.dropout_2b1.training and net.b7.dropout_2b2.training  # dropout does follow train()
    assert (net.b6.dropout_2b1.p, net.b6.dropout_2b2.p, net.b7.dropout_2b1.p, net.b7.dropout_2b2.p) == \
        (0.3, 0.3, 0.5, 0.5)
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in stats.items())
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert all(n in frozen for n, _ in net.named_parameters() if n.split(".")[0] in ("conv1a", "b2", "b2_1", "b2_2"))
    assert all(n in frozen for n, _ in net.named_parameters() if ".bn" in n or n.startswith("bn7"))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[1].startswith("conv") for n in trainable)
    assert "b3.conv_branch2a.weight" in trainable and "b7.conv_branch2b2.weight" in trainable
    assert len([k for k in net.state_dict() if not k.endswith("num_batches_tracked")]) == NUM_TENSORS
