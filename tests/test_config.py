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
    "coco": dict(crop=513, epochs=30, lr=0.004, head=10.0, batch=8, mode="whole", backbone="xception65_unimatch"),
    "ade20k": dict(crop=512, epochs=40, lr=0.004, head=10.0, batch=8, mode="whole", backbone="resnet101s"),
}


# supervised-voc-slrnet-pseudo is SLRNet's stage 2 (mmseg's settings), checked in test_slrnet.py.
@pytest.mark.parametrize("name", [n for n in recipe_names() if n.split("-")[1] in SUPERVISED and n.startswith("supervised-")
                                  and "slrnet" not in n])
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


# The semi-supervised papers' settings: UniMatch (specs/semivl_unimatch.md §1.4), PrevMatch (semiovs_sed.md
# §3, §4.1), S4MC + FixMatch (slrnet_s4mc.md B1, B4: the co-author repo's pascal.yaml / cityscapes.yaml).
SSL = {
    ("unimatch", "voc"): dict(crop=321, epochs=80, lr=0.001, head=10.0, tau=0.95, loss="ce", mode="whole", os=16),
    ("fixmatch", "voc"): dict(crop=321, epochs=80, lr=0.001, head=10.0, tau=0.95, loss="ce", mode="whole", os=16),
    ("prevmatch", "voc"): dict(crop=321, epochs=80, lr=0.001, head=10.0, tau=0.95, loss="ce", mode="whole", os=16),
    ("unimatch", "cityscapes"): dict(crop=801, epochs=240, lr=0.005, head=1.0, tau=0.0, loss="ohem", mode="slide_sum",
                                     os=16, window=(801, 534), min_kept=200000),
    ("unimatch", "coco"): dict(crop=513, epochs=30, lr=0.004, head=10.0, tau=0.95, loss="ce", mode="whole", os=16,
                               backbone="xception65_unimatch"),
    ("unimatch", "ade20k"): dict(crop=512, epochs=40, lr=0.004, head=10.0, tau=0.95, loss="ce", mode="whole", os=16),
    ("s4mc", "voc"): dict(crop=512, epochs=90, lr=0.001, head=10.0, loss="ce", mode="whole", os=16),
    ("s4mc", "cityscapes"): dict(crop=769, epochs=240, lr=0.005, head=1.0, loss="ohem", mode="slide_sum", os=8,
                                 window=(769, 512), min_kept=100000),
}
SSL_SPLITS = {
    "unimatch-voc": ["92", "183", "366", "732", "1464", "1_16", "1_8", "1_4"],
    "fixmatch-voc": ["92", "183", "366", "732", "1464", "1_16", "1_8", "1_4"],
    "prevmatch-voc": ["92", "183", "366", "732", "1464"],
    "s4mc-voc": ["92", "183", "366", "732", "1464"],
    "unimatch-cityscapes": ["1_30", "1_16", "1_8", "1_4", "1_2"],
    "s4mc-cityscapes": ["1_16", "1_8", "1_4", "1_2"],
    "unimatch-coco": ["1_512", "1_256", "1_128", "1_64", "1_32"],
    "unimatch-ade20k": ["1_128", "1_64", "1_32", "1_16", "1_8"],
}


def test_every_paper_ssl_recipe_exists():
    names = set(recipe_names())
    want = {f"{family}-{split}" for family, splits in SSL_SPLITS.items() for split in splits}
    want |= {f"{m}-{d}" for m in ("fixmatch", "unimatch", "prevmatch", "s4mc") for d in ("camvid-1_8", "synthetic")}
    assert want <= names, sorted(want - names)


@pytest.mark.parametrize("name", [n for n in recipe_names() if tuple(n.split("-")[:2]) in SSL])
def test_ssl_paper_recipes_match_the_spec(name):
    from semiseg_cli.data.splits import read_split, split_path

    cfg = load_config(name)
    method, dataset, split = name.split("-", 2)
    want = SSL[(method, dataset)]
    tr, opt, ssl = cfg["train"], cfg["optim"], cfg["ssl"]
    assert cfg["method"] == method and cfg["dataset"]["name"] == dataset
    assert (tr["crop_size"], tr["epochs"], tr["iters"], tr["global_batch"]) == (want["crop"], want["epochs"], None, 8)
    assert (opt["name"], opt["lr"], opt["lr_mult"]["head"], opt["momentum"], opt["weight_decay"], opt["poly_power"]) == \
        ("sgd", want["lr"], want["head"], 0.9, 1e-4, 0.9)
    assert cfg["model"]["backbone"] == want.get("backbone", "resnet101s") and cfg["model"]["head_channels"] == 256
    assert cfg["model"]["output_stride"] == want["os"]
    assert tr["labeled_loss"] == want["loss"] and cfg["eval"]["mode"] == want["mode"]
    if want["loss"] == "ohem":
        assert (tr["ohem_thresh"], tr["ohem_min_kept"]) == (0.7, want["min_kept"])
    if "window" in want:
        assert (cfg["eval"]["crop"], cfg["eval"]["stride"]) == want["window"]
    if "tau" in want:
        assert ssl["conf_thresh"] == want["tau"]
    if method == "prevmatch":
        assert (ssl["prev_conf_thresh"], ssl["prev_pool_size"], ssl["prev_max_models"]) == (0.9, 8, 3)
        assert tr["amp"] == "fp16"
    if method == "s4mc":
        assert (ssl["s4mc_base"], ssl["s4mc_drop_percent"], ssl["s4mc_neighbourhood"]) == ("fixmatch", 60, 4)
    # the split exists, with the paper's labeled count
    labeled = read_split(split_path(dataset, cfg["dataset"]["split"], "labeled", "/nonexistent"))
    counts = {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464}
    if dataset == "voc" and split in counts:
        assert len(labeled) == counts[split]
    if dataset == "cityscapes":
        assert len(labeled) == {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}[split]
