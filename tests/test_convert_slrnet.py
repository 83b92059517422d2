"""`convert-weights slrnet`: a checkpoint in the layout SLRNet's trainers save (built here from a random small
SLRNet under the original's names, with its alias copies and PAMR buffers; specs/checked_against_originals.md,
SLRNet) becomes a semiseg checkpoint that predicts exactly like the model it came from."""
from __future__ import annotations

import json

import pytest
import torch

from semiseg_cli.config import load_config
from semiseg_cli.convert.slrnet import alias_of, rename
from semiseg_cli.models import build_model

SMALL = ["model.backbone=resnet18", "model.head_channels=16", "model.weights=null"]
SETS = [a for s in SMALL for a in ("--set", s)]
# the original's `newly_added` ModuleList, in its order (sg and initialize_dictionary hold no tensors)
NEWLY_ADDED = ["aspp", "shallow_mask", "sg", "fc8_skip", "fc8_x", "last_conv", "factorization_reconstruction",
               "initialize_dictionary", "aux_head"]


def small_model(variant="wss", seed=0):
    """A random SLRNet (resnet18, head 16, synthetic K = 6) with random BN statistics too."""
    torch.manual_seed(seed)
    cfg = load_config("slrnet-synthetic", [*SMALL, f"slrnet.variant={variant}"])
    model = build_model(cfg, load_weights=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(123)
                if m.affine:
                    m.weight.normal_(1, 0.1)
                    m.bias.normal_(0, 0.1)
    return model.eval()


def released_layout(model, pamr=True, counters=True) -> dict:
    """model.module.state_dict() of SLRNet's Net: head.* at the top level, head.cvlr.* as
    factorization_reconstruction.*, newly_added.{i}.* copies, PAMR's kernel buffers."""
    sd = {}
    for k, v in model.state_dict().items():
        if not counters and k.endswith("num_batches_tracked"):
            continue
        k = k.replace("head.cvlr.", "factorization_reconstruction.", 1).removeprefix("head.")
        sd[k] = v.clone()
    for i, name in enumerate(NEWLY_ADDED):
        sd.update({f"newly_added.{i}.{k[len(name) + 1:]}": v.clone() for k, v in list(sd.items())
                   if k.startswith(name + ".")})
    if pamr:
        sd.update({"_aff.aff_x.kernel": torch.zeros(8, 1, 3, 3), "_aff.aff_m.kernel": torch.zeros(8, 1, 3, 3),
                   "_aff.aff_std.kernel": torch.zeros(9, 1, 3, 3)})
    return sd


def save_released(sd: dict, path):
    """{'state_dict', 'epoch', 'optimizer'} as SLRNet's trainers write it (a real SGD state with momentum)."""
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.save({"state_dict": sd, "epoch": 20, "optimizer": opt.state_dict()}, path)
    return path


def test_the_rename_table_and_the_aliases():
    assert rename("backbone.layer1.0.conv1.weight") == "backbone.layer1.0.conv1.weight"
    assert rename("backbone.b4_5.bn_branch2a.running_var") == "backbone.b4_5.bn_branch2a.running_var"
    assert rename("aspp.aspp2.atrous_conv.weight") == "head.aspp.aspp2.atrous_conv.weight"
    assert rename("shallow_mask.fc_skip.1.running_mean") == "head.shallow_mask.fc_skip.1.running_mean"
    assert rename("factorization_reconstruction.transform2.bias") == "head.cvlr.transform2.bias"
    assert rename("last_conv.8.weight") == "head.last_conv.8.weight"
    assert rename("backbone.fixed_layers.0.weight") is None and rename("fc8.weight") is None
    # resnet38d's fixed_layers = [conv1a, b2, b2_1, b2_2] (WideResNet-38 only) and the head's newly_added list
    assert alias_of("backbone.fixed_layers.0.weight") == "backbone.conv1a.weight"
    assert alias_of("backbone.fixed_layers.1.conv_branch1.weight") == "backbone.b2.conv_branch1.weight"
    assert alias_of("backbone.fixed_layers.3.bn_branch2b1.num_batches_tracked") == \
        "backbone.b2_2.bn_branch2b1.num_batches_tracked"
    assert alias_of("newly_added.6.transform1.weight") == "factorization_reconstruction.transform1.weight"
    assert alias_of("newly_added.8.4.bias") == "aux_head.4.bias"
    assert alias_of("newly_added.9.weight") is None and alias_of("backbone.fixed_layers.4.weight") is None
    assert alias_of("aspp.conv1.weight") is None


def test_a_released_checkpoint_converts_evaluates_infers_and_predicts_like_its_model(tmp_path, tiny_root, semiseg):
    model = small_model()
    sd = released_layout(model)
    src = save_released(sd, tmp_path / "checkpoint20.pth.tar")
    dst = tmp_path / "converted" / "slrnet.pt"
    code, out, err = semiseg("convert-weights", "slrnet", src, dst, "--recipe", "slrnet-synthetic", *SETS, "-v")
    assert code == 0, err
    n_model = len(model.state_dict())
    assert json.loads(out)["keys"] == n_model
    text = "\n".join(err)
    assert "factorization_reconstruction.transform1.weight -> head.cvlr.transform1.weight\n" in text
    assert "shallow_mask.fc_deep.0.weight -> head.shallow_mask.fc_deep.0.weight\n" in text
    assert "newly_added.5.8.weight -> (dropped: alias of last_conv.8.weight" in text
    assert "_aff.aff_std.kernel -> (dropped: PAMR" in text
    assert f"{len(sd)} source keys: {n_model} mapped, {len(sd) - n_model} dropped" in err[-1]

    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["config"]["slrnet"]["variant"] == "wss" and ckpt["config"]["model"]["backbone"] == "resnet18"
    converted = build_model(ckpt["config"], load_weights=False)
    converted.load_state_dict(ckpt["model"], strict=True)
    converted.eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
        for a, b in zip(converted(x, with_scores=True), model(x, with_scores=True)):
            assert torch.equal(a, b)

    code, out, err = semiseg("eval", "--checkpoint", dst, "--json", "--set", f"dataset.root={tiny_root}")
    assert code == 0, err
    assert 0 <= json.loads(out)["miou"] <= 100
    code, _, err = semiseg("infer", "--checkpoint", dst, "--images", tiny_root / "images" / "00003.png",
                           "--out", tmp_path / "pred")
    assert code == 0, err
    assert (tmp_path / "pred" / "00003.png").is_file()


def test_the_variant_without_image_labels_and_a_file_without_bn_counters(tmp_path, semiseg):
    """last_conv with K outputs converts under slrnet.variant semi_nocls only; a file of torch < 0.4.1 (no
    num_batches_tracked, no PAMR buffers) converts with the counters at 0."""
    model = small_model("semi_nocls", seed=1)
    src = save_released(released_layout(model, pamr=False, counters=False), tmp_path / "checkpoint32.pth.tar")
    code, _, err = semiseg("convert-weights", "slrnet", src, tmp_path / "wss.pt", "--recipe", "slrnet-synthetic", *SETS)
    assert code == 2 and len(err) == 1, err
    assert "without image labels" in err[0] and "slrnet-voc-semi-nolabels" in err[0], err
    assert "slrnet.variant=semi_nocls" in err[0] and not (tmp_path / "wss.pt").exists()

    dst = tmp_path / "nocls.pt"
    code, _, err = semiseg("convert-weights", "slrnet", src, dst, "--recipe", "slrnet-synthetic", *SETS,
                           "--set", "slrnet.variant=semi_nocls", "-q")
    assert code == 0, err
    ckpt = torch.load(dst, weights_only=True)
    assert int(ckpt["model"]["head.fc8_x.1.num_batches_tracked"]) == 0
    converted = build_model(ckpt["config"], load_weights=False)
    converted.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model(x))


def test_an_inconsistent_alias_a_renamed_key_or_no_recipe_is_one_line_naming_it(tmp_path, semiseg):
    sd = released_layout(small_model())

    def convert(name, state, *args):
        path = save_released(state, tmp_path / f"{name}.pth.tar")
        code, _, err = semiseg("convert-weights", "slrnet", path, tmp_path / f"{name}.pt", *args, "-q")
        assert code == 2 and len(err) == 1 and not (tmp_path / f"{name}.pt").exists(), err
        return err[0]

    bad = dict(sd)
    bad["newly_added.5.8.weight"] = bad["newly_added.5.8.weight"] + 1e-3
    line = convert("alias", bad, "--recipe", "slrnet-synthetic", *SETS)
    assert "newly_added.5.8.weight differs from last_conv.8.weight" in line

    renamed = {("fc8_x_.0.weight" if k == "fc8_x.0.weight" else k): v for k, v in sd.items()}
    assert "fc8_x_.0.weight is not an SLRNet key" in convert("renamed", renamed, "--recipe", "slrnet-synthetic", *SETS)

    missing = {k: v for k, v in sd.items() if k != "aspp.bn1.running_var"}  # its alias newly_added.0.* stays
    assert "newly_added.0.bn1.running_var is an alias of aspp.bn1.running_var, which the file lacks" in \
        convert("missing", missing, "--recipe", "slrnet-synthetic", *SETS)
    del missing["newly_added.0.bn1.running_var"]
    assert "missing target keys (e.g. head.aspp.bn1.running_var)" in \
        convert("missing2", missing, "--recipe", "slrnet-synthetic", *SETS)

    line = convert("norecipe", sd)
    assert all(r in line for r in ("--recipe", "slrnet-voc-wss", "slrnet-voc-semi ", "slrnet-voc-semi-nolabels"))


def test_an_image_label_checkpoint_under_the_no_label_recipe_names_the_recipes_that_fit(tmp_path):
    from semiseg_cli.convert.slrnet import check_variant
    from semiseg_cli.errors import UserError

    cfg = {"slrnet": {"variant": "semi_nocls"}}
    with pytest.raises(UserError, match="K-1 = 20 outputs.*--recipe slrnet-voc-wss .* or slrnet-voc-semi "):
        check_variant("cls", cfg, "slrnet-voc-semi-nolabels", "checkpoint20.pth.tar", 20)
