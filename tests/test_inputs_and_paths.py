"""Inputs that used to pass silently or crash, through the CLI's entry point: 16-bit and float images, a
pixel limit, binary image lists, duplicate output names, truncated images in a download (prepare-data
decodes every file it links or copies; --copy); and paths: a run stores absolute paths, a convert-weights
hint never names an existing file, the packaged efficientnet-lite0 weights are made on first use."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semiseg_cli.data.reader import load_image
from semiseg_cli.errors import UserError
from tests.conftest import TINY


def tiny_args(root, *extra):
    return [a for s in [f"dataset.root={root}", *TINY, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory):
    """A 2-iteration run, trained from another folder with a relative dataset.root."""
    from tests.conftest import run_cli

    base = tmp_path_factory.mktemp("rel")
    (base / "data").symlink_to(tiny_root)
    run_cli("train", "--recipe", "supervised-synthetic", *tiny_args("data", "train.iters=2", "train.eval_every=2"),
            "--out", "run", cwd=base, check=0)
    return base / "run"


# ------------------------------------------------------------------------------------------- images

def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)       # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (32, 32, 3) and np.array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert (rgb[..., 0] < 255).mean() > 0.9                                 # PIL's convert made 99 % white
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[..., 0].max() == 255
    Image.fromarray(np.full((8, 8), 7.5, np.float32)).save(tmp_path / "bad.tif")
    with pytest.raises(UserError, match="outside 0..1"):
        load_image(tmp_path / "bad.tif")


def test_images_over_the_pixel_limit_are_one_line_with_the_option(semiseg, tiny_run, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(big)
    monkeypatch.setenv("SEMISEG_MAX_IMAGE_PIXELS", "100000")
    code, _, err = semiseg("infer", "--checkpoint", tiny_run / "last.pt", "--images", big, "--out", tmp_path / "p")
    assert code == 2 and len(err) <= 3
    assert f"{big}: 400x300 = 120,000 pixels, over the limit of 100,000" in err[-1]
    assert "SEMISEG_MAX_IMAGE_PIXELS" in err[-1]
    monkeypatch.setenv("SEMISEG_MAX_IMAGE_PIXELS", "200000")
    code, _, err = semiseg("infer", "--checkpoint", tiny_run / "last.pt", "--images", big, "--out", tmp_path / "p")
    assert code == 0 and (tmp_path / "p" / "big.png").is_file()


def test_a_binary_images_list_and_duplicate_stems_are_refused(semiseg, tiny_run, tiny_root, tmp_path):
    binary = tmp_path / "list.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = semiseg("infer", "--checkpoint", tiny_run / "last.pt", "--images", binary, "--out", tmp_path / "p")
    assert code == 2 and len(err) == 1 and "not an image list (binary data" in err[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(tiny_root / "images" / "00003.png", tmp_path / "a" / "x.png")
    Image.open(tiny_root / "images" / "00004.png").convert("RGB").save(tmp_path / "b" / "x.jpg")
    listing = tmp_path / "two.txt"
    listing.write_text("a/x.png\nb/x.jpg\n")
    for cmd in (["infer", "--checkpoint", tiny_run / "last.pt"], ["gen-pseudo", "--model", "checkpoint",
                                                                   "--checkpoint", tiny_run / "last.pt"]):
        code, _, err = semiseg(*cmd, "--images", listing, "--out", tmp_path / "q")
        assert code == 2 and len(err) == 1 and "have the same stem" in err[0] and "x.png" in err[0]
    assert not (tmp_path / "q").exists()


def _camvid_source(shared_data, dst: Path, n: int = 3) -> Path:
    """A small CamVid download (n train images, the real files), for --allow-partial runs."""
    for split in ("train", "trainannot"):
        (dst / split).mkdir(parents=True)
        for p in sorted((shared_data / "camvid" / split).glob("*.png"))[:n]:
            shutil.copy(p, dst / split / p.name)
    for split in ("val", "valannot"):
        (dst / split).mkdir()
    return dst


def test_prepare_data_decodes_every_image_and_copy_makes_real_files(semiseg, shared_data, tmp_path):
    src = _camvid_source(shared_data, tmp_path / "src")
    victim = sorted((src / "train").glob("*.png"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])                   # a truncated download: its header is fine
    code, _, err = semiseg("prepare-data", "camvid", "--src", src, "--root", tmp_path / "root", "--allow-partial")
    errors = [ln for ln in err if not ln.startswith("camvid ")]        # (progress lines: "camvid train 1/3")
    assert code == 2 and len(errors) == 1 and f"{victim}: not a readable image" in errors[0] == err[-1]
    assert not (tmp_path / "root" / "train" / victim.name).exists()

    victim.write_bytes(data)
    code, out, err = semiseg("prepare-data", "camvid", "--src", src, "--root", tmp_path / "copied", "--allow-partial",
                             "--copy")
    assert code == 0, err
    images = sorted((tmp_path / "copied" / "train").glob("*.png"))
    assert len(images) == 3 and not any(p.is_symlink() for p in images)
    for p in images:
        assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256((src / "train" / p.name).read_bytes()).digest()
    shutil.rmtree(src)                                             # the copied root no longer needs the download
    assert np.asarray(load_image(images[0])).shape[2] == 3
    assert not list((tmp_path / "copied").rglob("*.tmp*"))


# -------------------------------------------------------------------------------------------- paths

def test_a_run_stores_absolute_paths_and_works_from_another_folder(semiseg, tiny_run, tiny_root, tmp_path,
                                                                    monkeypatch):
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    root = cfg["dataset"]["root"]
    assert os.path.isabs(root) and Path(root) == (tiny_run.parent / "data").resolve()
    assert torch.load(tiny_run / "last.pt", weights_only=True)["config"]["dataset"]["root"] == root
    monkeypatch.chdir(tmp_path)                                    # elsewhere: the stored root still finds the data
    code, out, err = semiseg("eval", "--run", tiny_run, "--json")
    assert code == 0, err


def test_a_convert_hint_never_names_an_existing_file(semiseg, tiny_run, tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best = tiny_run / "best.pt"
    code, _, err = semiseg("train", "--recipe", "supervised-synthetic",
                           *tiny_args(tiny_root, f"model.weights={best}", "model.backbone=tf_efficientnet_lite0"),
                           "--out", tmp_path / "r")
    assert code == 2 and len(err) == 1
    assert "a semiseg training checkpoint, not a weights file for model.weights" in err[0]
    hint = err[0].rsplit("`", 2)[-2]
    assert hint.startswith("semiseg convert-weights efficientnet-lite0 - ")
    assert not Path(hint.split()[-1]).exists() and hint.split()[-1] != str(best)


def test_the_packaged_efficientnet_lite0_weights_are_made_on_first_use(semiseg, tiny_root, tmp_path):
    weights = tmp_path / "weights" / "tf_efficientnet_lite0.pt"
    code, out, err = semiseg("train", "--recipe", "supervised-synthetic",
                             *tiny_args(tiny_root, f"model.weights={weights}", "model.backbone=tf_efficientnet_lite0"),
                             "--out", tmp_path / "r", "--dry-run")
    assert code == 0, err
    assert weights.is_file() and any(ln.startswith(f"note: made {weights} from the installed") for ln in err)
    state = torch.load(weights, weights_only=True)
    assert len(state) == 296 and all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
