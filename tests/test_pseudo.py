"""`semiseg gen-pseudo` through the real CLI: labels, confidences and scores equal the prediction `eval`
makes; resumable; folder / file / list inputs; a corrupt image; torchrun shards; the list trains; MaskCLIP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.data.reader import load_image
from semiseg_cli.data.splits import read_split
from semiseg_cli.data.transforms import normalize, to_uint8_tensor
from tests.conftest import TINY, run_cli


def sets(*pairs):
    return [a for s in pairs for a in ("--set", s)]


@pytest.fixture(scope="module")
def checkpoint(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("pseudo-run") / "run"
    run_cli("train", "--recipe", "supervised-synthetic", *sets(f"dataset.root={tiny_root}", *TINY, "train.iters=4",
                                                               "train.eval_every=4"), "--out", run, check=0)
    return run / "best.pt"


@pytest.fixture
def root(tiny_root, tmp_path):
    """A dataset root of its own (images shared by symlink) with a list of 6 images to label."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(tiny_root / "images")
    (data / "masks").symlink_to(tiny_root / "masks")
    (data / "classes.txt").write_text((tiny_root / "classes.txt").read_text())
    val = read_split(tiny_root / "splits" / "val.txt")
    (data / "splits").mkdir()
    (data / "splits" / "val.txt").write_text((tiny_root / "splits" / "val.txt").read_text())
    (data / "pick.txt").write_text("".join(f"{image}\n" for image, _ in val))
    return data


def direct_scores(checkpoint, image_path):
    """The prediction `eval` makes for one image, as probabilities."""
    from semiseg_cli.engine.checkpoint import model_from_checkpoint
    from semiseg_cli.engine.evaluate import predict, probabilities

    cfg, model = model_from_checkpoint(checkpoint)
    model.eval()
    img = load_image(image_path)
    x = normalize(to_uint8_tensor(img)[None])
    with torch.no_grad():
        return probabilities(predict(model, x, cfg, out_size=(img.height, img.width)), cfg)[0].numpy()


def test_labels_confidences_and_scores_are_the_eval_prediction(checkpoint, root):
    lines = (root / "pick.txt").read_text().split()
    direct = {line.rsplit("/", 1)[-1][:-4]: direct_scores(checkpoint, root / line) for line in lines}
    # a threshold inside this short-trained model's confidences, so that it ignores some pixels, not all
    tau = round(float(np.median(np.concatenate([s.max(0).ravel() for s in direct.values()]))), 4)
    out = root / "pseudo"
    proc = run_cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", checkpoint, "--images", root / "pick.txt",
                   "--out", out, "--ignore-below", tau, "--save-conf", "--save-scores", "--batch-size", "1",
                   "--list", root / "splits" / "pseudo" / "labeled.txt", "--root", root, check=0)
    summary = json.loads(proc.stdout)
    assert summary["written"] == 6 and summary["skipped"] == 0 and summary["failed"] == 0
    ignored = pixels = 0
    for stem, scores in direct.items():
        conf = scores.max(0)
        want = scores.argmax(0).astype(np.uint8)
        want[conf < tau] = 255
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and np.array_equal(np.array(label), want)
        np.testing.assert_allclose(np.load(out / "scores" / f"{stem}.npy"), scores, atol=1e-6)
        assert np.array_equal(np.array(Image.open(out / "conf" / f"{stem}.png")), np.round(255 * conf).astype(np.uint8))
        ignored, pixels = ignored + int((want == 255).sum()), pixels + want.size
    assert summary["ignored_fraction"] == pytest.approx(ignored / pixels, abs=1e-4)
    assert 0 < ignored < pixels  # the threshold bites somewhere, not everywhere
    assert sum(summary["class_histogram"].values()) == pytest.approx(1.0, abs=1e-3)

    # the list is a training split: `<image> <mask>` relative to the root, one line per labelled image
    items = read_split(root / "splits" / "pseudo" / "labeled.txt")
    assert [i for i, _ in items] == (root / "pick.txt").read_text().split()
    assert all(m.startswith("pseudo/") for _, m in items)
    train = run_cli("train", "--recipe", "supervised-synthetic", *sets(f"dataset.root={root}", *TINY, "dataset.split=pseudo",
                                                                       "train.iters=2", "train.eval_every=2"),
                    "--out", root / "run2", check=0)
    assert np.isfinite(json.loads(train.stdout)["miou"])

    # a second run skips every finished image
    again = json.loads(run_cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", checkpoint, "--images",
                               root / "pick.txt", "--out", out, "--save-conf", "--save-scores", check=0).stdout)
    assert again["written"] == 0 and again["skipped"] == 6


def test_folder_and_file_inputs_and_a_corrupt_image(checkpoint, root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for line in (root / "pick.txt").read_text().split()[:3]:
        (folder / line.rsplit("/", 1)[-1]).write_bytes((root / line).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", checkpoint, "--images", folder, "--out",
                   tmp_path / "out")
    assert proc.returncode == 2 and "broken.png" in proc.stderr.strip().splitlines()[-1]
    assert json.loads(proc.stdout)["written"] == 3 and len(list((tmp_path / "out").glob("*.png"))) == 3
    one = sorted(folder.glob("0*.png"))[0]
    single = json.loads(run_cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", checkpoint, "--images", one,
                                "--out", tmp_path / "one", check=0).stdout)
    assert single["written"] == 1 and (tmp_path / "one" / f"{one.stem}.png").is_file()
    # two inputs with one stem would overwrite each other: refused before anything is written
    (tmp_path / "dup.txt").write_text(f"{one}\n{root / 'images' / one.name}\n")
    dup = run_cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", checkpoint, "--images", tmp_path / "dup.txt",
                  "--out", tmp_path / "dup")
    assert dup.returncode == 2 and "same stem" in dup.stderr


def test_torchrun_shards_the_images_and_writes_one_merged_list(checkpoint, root):
    args = ["gen-pseudo", "--model", "checkpoint", "--checkpoint", str(checkpoint), "--images", str(root / "pick.txt"),
            "--root", str(root)]
    run_cli(*args, "--out", root / "one", "--list", root / "one.txt", check=0)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semiseg_cli"]
    proc = subprocess.run(base + args + ["--out", str(root / "two"), "--list", str(root / "two.txt")], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 prints the summary over both processes
    assert summary["written"] == 6  # each image labelled once: the shards are disjoint
    one = [line.replace("one/", "X/") for line in (root / "one.txt").read_text().splitlines()]
    two = [line.replace("two/", "X/") for line in (root / "two.txt").read_text().splitlines()]
    assert one == two and len(one) == 6
    for f in (root / "one").glob("*.png"):
        assert np.array_equal(np.array(Image.open(f)), np.array(Image.open(root / "two" / f.name)))


def test_maskclip_labels_from_converted_clip_weights_with_prompt_ensembles(root, tmp_path):
    import open_clip
    import torch.nn.functional as F
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from semiseg_cli.models.clip_vit import MaskClipViT
    from semiseg_cli.models.prompts import templates

    torch.manual_seed(0)
    clip = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=64),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    weights = tmp_path / "clip_tiny.pt"
    run_cli("convert-weights", "open-clip", tmp_path / "clip.pt", weights, "--quiet", check=0)
    classes = [["background", ["sky", "clouds"]], "disc", ["square", "box"]]
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    out = tmp_path / "maskclip"
    run_cli("gen-pseudo", "--model", "maskclip", "--weights", weights, "--classes", tmp_path / "classes.json",
            "--images", root / "pick.txt", "--out", out, "--save-scores", "--set", "eval.img_scale=null", check=0)

    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        def name_embedding(name):
            e = clip.encode_text(tok([t.format(name) for t in templates("maskclip")]), normalize=True)
            return F.normalize(e.mean(0), dim=-1)

        concepts = [["background"], ["sky", "clouds"], ["disc"], ["square"], ["box"]]
        owner = [0, 0, 1, 2, 2]
        text = torch.stack([F.normalize(torch.stack([name_embedding(n) for n in c]).mean(0), dim=-1) for c in concepts])
        vit = MaskClipViT.from_file(weights, out_indices=())
        for line in (root / "pick.txt").read_text().split()[:2]:
            img = load_image(root / line)
            x = normalize(to_uint8_tensor(img)[None])
            sim = torch.einsum("bchw,nc->bnhw", vit(x)["dense"], text)  # ImageNet-normalised input (mmseg port)
            per_class = torch.stack([sim[:, [i for i, o in enumerate(owner) if o == c]].max(1).values for c in range(3)], 1)
            want = (100 * F.interpolate(per_class, size=(img.height, img.width), mode="bilinear",
                                        align_corners=False)).softmax(1)[0].numpy()
            stem = line.rsplit("/", 1)[-1][:-4]
            np.testing.assert_allclose(np.load(out / "scores" / f"{stem}.npy"), want, atol=1e-4)
            assert np.array_equal(np.array(Image.open(out / f"{stem}.png")), want.argmax(0))
