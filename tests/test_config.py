import json

import pytest

from semiseg_cli.config import load_config, parse_overrides, recipe_names
from semiseg_cli.errors import UserError
from tests.conftest import run_cli


def test_overrides_are_yaml_1_2():
    vals = parse_overrides(["a=1_8", "b=off", "c=1e-4", "d=92", "e=true", "f=[1, 2]"])
    assert vals == {"a": "1_8", "b": "off", "c": 1e-4, "d": 92, "e": True, "f": [1, 2]}


def test_layers_and_types():
    cfg = load_config("supervised-synthetic", ["train.iters=7", "dataset.split=92", "optim.lr=1", "optim.lr_mult.head=3"])
    assert cfg["train"]["iters"] == 7
    assert cfg["dataset"]["split"] == "92"  # ints become strings for string keys
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["optim"]["lr_mult"] == {"backbone": 1.0, "head": 3.0}
    assert cfg["dataset"]["num_classes"] == 6  # filled in from the class list


@pytest.mark.parametrize("override, words", [
    ("train.lr=0.1", "did you mean 'optim.lr'"),
    ("train.crop_sise=3", "did you mean 'train.crop_size'"),
    ("train.iters=ten", "train.iters must be int"),
    ("train.amp=of", "did you mean 'off'"),
    ("dataset.name=vocc", "did you mean 'voc'"),
    ("train.scale_range=[1]", "list of 2"),
    ("noequals", "expected key=value"),
])
def test_bad_overrides_are_user_errors(override, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_config("supervised-synthetic", [override])


def test_every_recipe_resolves():
    names = recipe_names()
    assert names, "no recipes packaged"
    for name in names:
        cfg = load_config(name)
        assert cfg["description"], f"{name} has no description"


def test_cli_config_show_json_and_errors(tmp_path):
    proc = run_cli("config", "show", "--recipe", "supervised-synthetic", "--set", "train.iters=3", "--json", check=0)
    cfg = json.loads(proc.stdout)
    assert cfg["train"]["iters"] == 3 and cfg["dataset"]["name"] == "synthetic"
    bad = run_cli("config", "show", "--recipe", "supervised-synthetc", check=2)
    assert "did you mean 'supervised-synthetic'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("method: supervised\ntrain:\n  crop_sizee: 3\n")
    bad = run_cli("config", "show", "--recipe", recipe, check=2)
    assert "mine.yaml" in bad.stderr and "train.crop_size" in bad.stderr
    recipe.write_text("train: [\n")
    bad = run_cli("config", "show", "--recipe", recipe, check=2)
    assert "invalid YAML" in bad.stderr


def test_cli_recipes_lists_descriptions():
    proc = run_cli("recipes", "--json", check=0)
    rows = json.loads(proc.stdout)
    assert set(rows) == set(recipe_names()) and all(rows.values())


# The papers' supervised-baseline settings (specs/semivl_unimatch.md §1.4; UniMatch supervised.py).
SUPERVISED = {
    "voc": dict(crop=321, epochs=80, lr=0.001, head=10.0, batch=8, mode="whole", backbone="resnet101s"),
    "cityscapes": dict(crop=801, epochs=240, lr=0.005, head=1.0, batch=8, mode="slide_sum", backbone="resnet101s"),
    "coco": dict(crop=513, epochs=30, lr=0.004, head=10.0, batch=8, mode="whole", backbone="xception65"),
    "ade20k": dict(crop=512, epochs=40, lr=0.004, head=10.0, batch=8, mode="whole", backbone="resnet101s"),
}


@pytest.mark.parametrize("name", [n for n in recipe_names() if n.split("-")[1] in SUPERVISED and n.startswith("supervised-")])
def test_supervised_paper_recipes_match_the_spec(name):
    from semiseg_cli.data.splits import split_path

    cfg = load_config(name)
    want = SUPERVISED[cfg["dataset"]["name"]]
    tr, opt = cfg["train"], cfg["optim"]
    assert (tr["crop_size"], tr["epochs"], tr["iters"], tr["global_batch"]) == (want["crop"], want["epochs"], None, want["batch"])
    assert (opt["name"], opt["lr"], opt["lr_mult"]["head"], opt["momentum"], opt["weight_decay"]) == \
        ("sgd", want["lr"], want["head"], 0.9, 1e-4)
    assert cfg["eval"]["mode"] == want["mode"] and cfg["model"]["backbone"] == want["backbone"]
    assert cfg["model"]["head_channels"] == 256 and cfg["model"]["output_stride"] == 16
    assert tr["labeled_loss"] == ("ohem" if cfg["dataset"]["name"] == "cityscapes" else "ce")
    if cfg["dataset"]["name"] == "cityscapes":
        assert (cfg["eval"]["crop"], cfg["eval"]["stride"]) == (801, 534)
    split_path(cfg["dataset"]["name"], cfg["dataset"]["split"], "labeled", "/nonexistent")  # the split exists
