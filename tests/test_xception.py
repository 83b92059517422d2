"""UniMatch's Xception-65 (models/xception.py) against a re-statement of the original's forward with its
in-place ReLUs (UniMatch model/backbone/xception.py, read for the facts, written here from them), the
architecture facts, `convert-weights unimatch-xception` (the ImageNet file) and `unimatch-checkpoint` on a
COCO checkpoint in UniMatch's layout."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.models.xception import Block, SeparableConv2d, UniMatchXception
from tests.conftest import run_cli


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters (the initial ones make every BN an identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean = 0.2 * torch.randn(n, generator=g)
            m.running_var = 1 + 0.5 * torch.rand(n, generator=g)
    return model.eval()


# --- the original's op sequence: ReLUs in place where UniMatch's are (relu0 of sepconv1 in-place only when
# --- the block has an identity skip; of sepconv3 unless the block is built with inplace=False: block2)


def ref_sep(sep: SeparableConv2d, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    if sep.activate_first:
        x = torch.relu_(x) if inplace else torch.relu(x)
    x = sep.bn1(sep.depthwise(x))
    if not sep.activate_first:
        x = torch.relu_(x)
    x = sep.bn2(sep.pointwise(x))
    return x if sep.activate_first else torch.relu_(x)


def ref_block(block: Block, inp: torch.Tensor, block_inplace: bool = True):
    skip = block.skipbn(block.skip(inp)) if not block.identity else inp   # an alias of inp when identity
    x = ref_sep(block.sepconv1, inp, inplace=block.identity)              # head_relu: in place on inp (= skip)
    x = ref_sep(block.sepconv2, x, inplace=True)
    hook = x
    x = ref_sep(block.sepconv3, x, inplace=block_inplace)                 # in place on hook unless block2
    x += skip
    return x, hook


def ref_forward(net: UniMatchXception, x: torch.Tensor):
    x = torch.relu_(net.bn1(net.conv1(x)))
    x = torch.relu_(net.bn2(net.conv2(x)))
    x, _ = ref_block(net.block1, x)
    x, c1 = ref_block(net.block2, x, block_inplace=False)
    for i in range(3, 21):
        x, _ = ref_block(getattr(net, f"block{i}"), x)
    for conv in (net.conv3, net.conv4, net.conv5):
        x = ref_sep(conv, x, inplace=True)
    return c1, x


@pytest.mark.parametrize("os_", [16, 8])
def test_forward_equals_the_original_in_place_semantics(os_):
    torch.manual_seed(0)
    net = randomise(UniMatchXception(os_))
    x = torch.randn(2, 3, 65, 81)
    with torch.no_grad():
        c1, c4 = net(x)
        r1, r4 = ref_forward(net, x.clone())
    assert c1.shape == (2, 256, 17, 21) and c4.shape[1] == 2048 and c4.shape[-1] == (6 if os_ == 16 else 11)
    torch.testing.assert_close(c1, r1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c4, r4, atol=1e-5, rtol=1e-5)
    assert (c1 < 0).any()  # c1 is taken before block2's ReLU


def test_the_differences_from_timm_are_there():
    net = UniMatchXception(16)
    assert len(net.state_dict()) == 792
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and m.momentum == 0.0003 for m in bns)
    assert net.conv3.depthwise.dilation == (1, 1) and net.block20.sepconv1.depthwise.dilation == (1, 1)
    assert UniMatchXception(8).conv5.depthwise.dilation == (2, 2)
    # the middle flow rectifies its skip: relu(x) + F(relu(x))
    block = randomise(net.block4)
    x = torch.randn(1, 728, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x) + block.sepconv3(block.sepconv2(block.sepconv1(F.relu(x)))))


def test_convert_the_imagenet_file_and_build_with_it(tmp_path):
    """UniMatch's loader drops keys with 'itr', 'tmp', 'track'; the rest must be the model's weights."""
    net = randomise(UniMatchXception(16), seed=3)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}  # num_batches_tracked: contains 'track'
    torch.save(sd, tmp_path / "xception.pth")
    proc = run_cli("convert-weights", "unimatch-xception", tmp_path / "xception.pth", tmp_path / "x.pt", "-v", check=0)
    assert json.loads(proc.stdout)["backbone"] == "xception65_unimatch"
    assert "(dropped: UniMatch's loader drops keys" in proc.stderr
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    cfg = load_config("unimatch-coco-1_32", [f"model.weights={tmp_path / 'x.pt'}", "model.head_channels=16"])
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        got, want = model.backbone(x), net(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # a renamed key is one line naming it
    bad = dict(sd)
    bad["module.block1.skip.weightX"] = bad.pop("module.block1.skip.weight")
    torch.save(bad, tmp_path / "bad.pth")
    proc = run_cli("convert-weights", "unimatch-xception", tmp_path / "bad.pth", tmp_path / "y.pt", "-q")
    assert proc.returncode == 2 and "block1.skip.weight" in proc.stderr and "Traceback" not in proc.stderr


def test_a_coco_checkpoint_in_unimatch_layout_converts_and_predicts_the_same(tmp_path):
    from semiseg_cli.config import load_config
    from semiseg_cli.engine.checkpoint import model_from_checkpoint
    from semiseg_cli.models import build_model

    cfg = load_config("unimatch-coco-1_32", ["model.weights=null"])
    torch.manual_seed(1)
    ours = randomise(build_model(cfg, load_weights=False), seed=5)
    # UniMatch's names (convert/unimatch_checkpoint.py table, read backwards), under DDP's module.
    back = {"head.aspp.branches.4.conv.0.": "head.b4.gap.1.", "head.aspp.branches.4.conv.1.": "head.b4.gap.2.",
            "head.aspp.project.": "head.project.", "head.reduce.": "reduce.", "head.fuse.0.0.": "fuse.0.",
            "head.fuse.0.1.": "fuse.1.", "head.fuse.1.0.": "fuse.3.", "head.fuse.1.1.": "fuse.4.",
            "head.classifier.": "classifier."}

    def original_name(k):
        for new, old in back.items():
            if k.startswith(new):
                return old + k[len(new):]
        if k.startswith("head.aspp.branches."):
            return "head.b" + k[len("head.aspp.branches."):]
        return k

    sd = {f"module.{original_name(k)}": v for k, v in ours.state_dict().items()}
    assert "module.backbone.block20.skipbn.running_var" in sd and "module.head.b4.gap.1.weight" in sd
    torch.save({"model": sd, "epoch": 29, "previous_best": 44.4}, tmp_path / "best.pth")
    run_cli("convert-weights", "unimatch-checkpoint", tmp_path / "best.pth", tmp_path / "best.pt",
            "--recipe", "unimatch-coco-1_32", "-q", check=0)
    _, converted = model_from_checkpoint(tmp_path / "best.pt")
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), ours(x))
