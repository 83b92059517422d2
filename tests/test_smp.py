"""model.name=smp: every segmentation-models-pytorch arch keeps the model contract, weights load, and the
real CLI trains and evaluates it."""
import json
import math
import subprocess
import sys

import pytest
import torch

from semiseg_cli.config import CHOICES, load_config
from semiseg_cli.errors import UserError
from semiseg_cli.models import build_model
from semiseg_cli.models.smp import ARCHS, SmpModel
from tests.conftest import TINY, run_cli

ENCODER = "resnet10t"  # the smallest timm ResNet: the whole file stays fast on 2 cores


@pytest.mark.parametrize("arch", list(ARCHS))
def test_arch_keeps_the_model_contract(arch):
    torch.manual_seed(0)
    model = SmpModel(arch, ENCODER, num_classes=5)
    assert ARCHS[arch][0] == model.backbone.output_stride  # the table says what smp itself checks
    children = {name for name, child in model.named_children() if any(p.requires_grad for p in child.parameters())}
    assert children == {"backbone", "head"}
    x = torch.randn(2, 3, 50, 70)  # not a multiple of any arch's stride
    assert model(x).shape == (2, 5, 50, 70)
    clean, fp = model(x, need_fp=True)
    assert clean.shape == fp.shape == (2, 5, 50, 70)
    assert not torch.allclose(clean, fp)  # dropout on the features changed the perturbed half
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_unknown_arch_names_the_valid_ones():
    with pytest.raises(UserError, match="did you mean 'Unet'.*UnetPlusPlus.*Segformer"):
        SmpModel("Unett", ENCODER, 3)
    with pytest.raises(UserError, match="is not one of"):
        load_config(None, ["model.name=smp", "model.arch=Unett"])


def test_config_choices_are_the_arch_table_and_reading_a_config_imports_no_torch():
    assert CHOICES["model.arch"] == list(ARCHS)
    code = "import sys, semiseg_cli.config; print(sorted({'torch', 'segmentation_models_pytorch'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_converted_encoder_weights_load(tmp_path):
    torch.manual_seed(0)
    source = SmpModel("FPN", ENCODER, 3)
    torch.save(source.timm_model.state_dict(), tmp_path / "enc.pt")
    cfg = load_config(None, ["model.name=smp", "model.arch=Unet", f"model.backbone={ENCODER}",
                             f"model.weights={tmp_path / 'enc.pt'}"])
    model = build_model(cfg)
    x = torch.randn(1, 3, 64, 64)
    source.eval(), model.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source.backbone(x), model.backbone(x)))
    cfg["model"]["backbone"] = "resnet18"  # a file for another backbone is refused with the command to make one
    with pytest.raises(UserError, match="does not fit.*convert-weights"):
        build_model(cfg)


@pytest.mark.parametrize("recipe,arch", [("supervised-synthetic", "Unet"), ("unimatch-synthetic", "FPN")])
def test_cli_trains_and_evaluates_an_smp_model(recipe, arch, tiny_root, tmp_path):
    run = tmp_path / "run"
    sets = [f"dataset.root={tiny_root}", *TINY, "model.name=smp", f"model.arch={arch}", f"model.backbone={ENCODER}",
            "train.iters=2", "train.eval_every=2"]
    proc = run_cli("train", "--recipe", recipe, *[a for s in sets for a in ("--set", s)], "--out", run, check=0)
    assert math.isfinite(json.loads(proc.stdout.strip().splitlines()[-1])["miou"])
    assert (run / "last.pt").is_file()
    ev = json.loads(run_cli("eval", "--run", run, "--json", check=0).stdout)
    assert math.isfinite(ev["miou"]) and ev["images"] == 6
