"""Every numeric config key has a valid range (config.RANGES), checked like types and choices; bad recipe
files (not UTF-8, invalid YAML) are one line naming the file."""
import subprocess
import sys
from pathlib import Path

import pytest

from semiseg_cli.config import (CHOICES, NULLABLE, OPEN, RANGES, check_range, defaults, flatten, load_config,
                                recipe_names)
from semiseg_cli.errors import UserError

SEMISEG = Path(sys.executable).parent / "semiseg"  # the installed console script


def _numeric(key, default) -> bool:
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if key in OPEN:
        return OPEN[key] in (int, float)
    if default is None:
        return NULLABLE.get(key) in (int, float, list)  # the nullable lists (eval.img_scale) hold numbers
    return num(default) or (isinstance(default, list) and bool(default) and all(num(v) for v in default))


def test_every_numeric_key_has_a_range():
    schema = flatten(defaults())
    numeric = {k for k, v in schema.items() if _numeric(k, v)}
    assert numeric, "no numeric keys found: the test is broken"
    missing = sorted(k for k in numeric if k not in RANGES and k not in CHOICES)
    assert not missing, f"add these keys to config.RANGES: {missing}"
    assert not set(RANGES) - set(schema), "RANGES names keys that defaults.yaml lacks"
    for key, (low, high, brackets) in RANGES.items():
        assert len(brackets) == 2 and brackets[0] in "[(" and brackets[1] in "])", key
        assert low is not None or high is not None, key
        check_range(key, schema[key], schema[key], "defaults.yaml")  # every default is in its own range


@pytest.mark.parametrize("override, words", [
    ("train.iters=-5", "train.iters = -5 is out of range: it must be >= 1 or null"),
    ("train.iters=0", "train.iters = 0"),
    ("optim.lr=0", "optim.lr = 0.0 is out of range: it must be > 0"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("optim.lr=.nan", "optim.lr = nan"),
    ("optim.lr=.inf", "optim.lr = inf"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.log_every=0", "train.log_every"),
    ("train.workers=-1", "train.workers = -1 is out of range: it must be >= 0"),
    ("train.global_batch=0", "train.global_batch"),
    ("train.crop_size=0", "train.crop_size"),
    ("eval.crop=0", "eval.crop"),
    ("crf.iters=-1", "crf.iters"),
    ("ssl.conf_thresh=1.5", "ssl.conf_thresh = 1.5 is out of range: it must be in [0, 1]"),
    ("train.ohem_thresh=-0.1", "train.ohem_thresh"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("optim.momentum=1", "optim.momentum = 1.0 is out of range: it must be in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1] = 1.0"),
    ("train.epochs=0", "train.epochs"),
    ("train.scale_range=[2.0, 0.5]", "train.scale_range = [2.0, 0.5] is reversed"),
    ("train.scale_range=[0, 2.0]", "train.scale_range[0] = 0.0"),
    ("optim.lr_mult.head=-1", "optim.lr_mult.head = -1.0"),
    ("eval.img_scale=[2048, 0]", "eval.img_scale[1] = 0"),
    ("model.output_stride=4", "model.output_stride = 4 is not one of 8, 16, 32"),
])
def test_out_of_range_values_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config("supervised-synthetic", [override])
    assert words in str(e.value) and "\n" not in str(e.value)
    if "range" in str(e.value) or "reversed" in str(e.value):
        assert "(default " in str(e.value)  # the hint


def test_values_at_the_edges_are_accepted():
    cfg = load_config("supervised-synthetic", [
        "train.iters=null", "train.workers=0", "optim.momentum=0", "ssl.conf_thresh=1.0", "ssl.conf_thresh=0",
        "crf.iters=0", "optim.weight_decay=0", "train.scale_range=[1.0, 1.0]", "train.crop_size=16",
        "optim.lr_mult.head=0", "eval.crop=null"])
    assert cfg["train"]["iters"] is None and cfg["train"]["scale_range"] == [1.0, 1.0]


def test_a_recipe_file_is_range_checked_and_named(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("method: supervised\noptim:\n  momentum: 1.2\n")
    with pytest.raises(UserError, match=r"mine\.yaml: optim\.momentum = 1\.2"):
        load_config(str(recipe))


def test_default_config_and_every_bundled_recipe_resolve():
    load_config(None)
    names = recipe_names()
    assert len(names) > 10
    for name in names:
        load_config(name)
    # `semiseg recipes` reads every recipe file too
    proc = subprocess.run([str(SEMISEG), "recipes", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _cli(*args):
    return subprocess.run([str(SEMISEG), *map(str, args)], capture_output=True, text=True, timeout=300)


def _one_clear_line(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_cli_train_with_out_of_range_values_exits_2(tmp_path):
    out = tmp_path / "run"
    proc = _cli("train", "--recipe", "supervised-synthetic", "--set", "train.iters=-5", "--out", out)
    _one_clear_line(proc, "train.iters", "-5", ">= 1")
    assert not out.exists()  # rejected before anything was written
    proc = _cli("train", "--recipe", "supervised-synthetic", "--set", "train.scale_range=[2.0, 0.5]", "--out", out)
    _one_clear_line(proc, "train.scale_range", "reversed")
    proc = _cli("config", "show", "--recipe", "supervised-synthetic", "--set", "optim.momentum=1.0")
    _one_clear_line(proc, "optim.momentum", "[0, 1)")


def test_cli_recipe_not_utf8_or_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("description: caf\xe9\nmethod: supervised\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.yaml: not UTF-8"):
        load_config(str(bad))
    proc = _cli("train", "--recipe", bad, "--out", tmp_path / "run")
    _one_clear_line(proc, "latin1.yaml", "UTF-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: supervised\ntrain: {crop_size: 64\n")
    proc = _cli("config", "show", "--recipe", broken)
    _one_clear_line(proc, "broken.yaml", "invalid YAML")
