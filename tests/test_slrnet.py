"""SLRNet: the method's formulas, its inference rules, its data modes and runs through the CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.config import load_config
from semiseg_cli.data.dataset import tagged_items
from semiseg_cli.data.streams import fake_batch
from semiseg_cli.methods import slrnet
from semiseg_cli.models import build_model
from semiseg_cli.models.slrnet import predicted_labels, restrict_to_labels
from tests.conftest import TINY, run_cli

SLR = ["method=slrnet", "model.name=slrnet", "model.backbone=resnet18", "model.head_channels=16"]


def test_voc_epoch_sizes_of_the_three_variants():
    # read from the packaged VOC 1464 lists only (no image is opened)
    for recipe, size, pixel in (("slrnet-voc-wss", 10582, 0), ("slrnet-voc-semi", 13510, 3 * 1464),
                                ("slrnet-voc-semi-nolabels", 19366, 7 * 1464)):
        cfg = load_config(recipe, ["dataset.root=/nonexistent"])
        items, labeled = tagged_items(cfg)
        assert len(items) == size, recipe
        assert sum(labeled or []) == pixel
        if labeled:  # the pixel-labelled images are the split's labeled ids (not the original's last 1,464 lines)
            assert {i for i, f in zip(items, labeled) if f} == set(map(tuple, tagged_items(
                load_config("slrnet-voc-wss", ["dataset.root=/nonexistent"]))[0][:1464]))


def test_the_stage_two_recipe_has_mmsegs_deeplabv3plus_voc_values():
    # SLRNet ships no stage-2 config; the recipe carries mmseg's deeplabv3plus_r101-d8_512x512_20k_voc12aug
    cfg = load_config("supervised-voc-slrnet-pseudo")
    tr, opt = cfg["train"], cfg["optim"]
    assert (tr["crop_size"], tr["iters"], tr["global_batch"]) == (512, 20000, 16)
    assert (opt["name"], opt["lr"], opt["weight_decay"], opt["schedule"], opt["poly_power"]) == ("sgd", 0.01, 5e-4, "poly", 0.9)
    assert opt["lr_mult"] == {"backbone": 1.0, "head": 1.0}
    assert (cfg["model"]["backbone"], cfg["model"]["output_stride"], cfg["dataset"]["split"]) == ("resnet101s", 8, "slrnet_pseudo")


def test_pseudo_masks_thresholds_and_ambiguity():
    m = torch.zeros(1, 3, 1, 5)
    m[0, 0] = torch.tensor([0.9, 0.5, 0.1, 0.6, 0.05])   # background: thresh max(0.7 x 0.9, 0.2) = 0.63
    m[0, 1] = torch.tensor([0.1, 0.5, 0.8, 0.7, 0.15])   # class 1: max(0.6 x 0.8, 0.2) = 0.48
    m[0, 2] = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.19])   # class 2: max(0.6 x 0.19, 0.2) = 0.2 -> never
    p = slrnet.pseudo_masks(m, 0.6, 0.2, 0.7)
    label = torch.where(p.sum(1) > 0, p.argmax(1), 255)[0, 0].tolist()
    # pixel 1: only class 1 > 0.48; pixel 3: class 1 (0.7 > 0.48), bg 0.6 < 0.63; pixel 4: none
    assert label == [0, 1, 1, 1, 255]
    m[0, 0, 0, 3] = 0.9                                   # background and class 1 both pass: ambiguous
    p = slrnet.pseudo_masks(m, 0.6, 0.2, 0.7)
    assert p[0, :, 0, 3].sum() == 0
    # the variant without image labels: bg factor 0.9, cutoffs 0.8 / 0.6
    p = slrnet.pseudo_masks(m, 0.8, 0.6, 0.9)
    assert p[0, :, 0, 0].tolist() == [1, 0, 0] and p[0, :, 0, 2].tolist() == [0, 1, 0]


def test_balanced_ce_equals_its_formula_and_gates_images():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[:, 0, :2] = 255
    pseudo = slrnet.onehot_labels(target, 3)
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = slrnet.balanced_ce(logits, pseudo, labels)
    for b in range(2):
        valid = target[b] != 255
        n = valid.sum().item()
        ce = F.cross_entropy(logits[b:b + 1], torch.where(valid, target[b], 0)[None], reduction="none")[0]
        counts = {c: (target[b] == c).sum().item() for c in range(3)}
        w = torch.tensor([[(n - counts[int(t)]) / (1 + n) if t != 255 else 0.0 for t in row] for row in target[b]])
        expected = (ce * w).sum() / 16
        present = sum(counts[c] > 0 for c in range(3))
        gate = float(present == labels[b].sum().item() + 1)
        assert torch.allclose(loss[b], expected * gate, atol=1e-6)
    assert loss[0] > 0 and loss[1] == 0  # image 1 has class 2 in its mask but only class 1 in its labels


def test_max_mask_keeps_the_winner_only():
    z = torch.tensor([[[[0.2]], [[0.5]], [[0.3]]]], requires_grad=True)
    out = slrnet.max_mask(z)
    assert out.flatten().tolist() == [0.0, 0.5, 0.0]
    out.sum().backward()
    assert z.grad.flatten().tolist() == [0.0, 1.0, 0.0]


def test_predicted_labels_rule_with_ties_at_the_sixth():
    logit = torch.logit
    p = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.4, 0.35, 0.2]])  # 6th and 7th tie at 0.4
    got = predicted_labels(logit(p), fp_cut=0.3, topk=6)
    assert got.tolist() == [[True] * 7 + [False, False]]          # both tied ones kept, 0.35 is 8th
    got = predicted_labels(logit(p), fp_cut=0.45, topk=6)
    assert got.tolist() == [[True] * 5 + [False] * 4]              # the cut applies too
    assert predicted_labels(logit(p), 0.1, 2).tolist() == [[True, True] + [False] * 7]


def test_restrict_to_labels_masks_then_powers_without_renormalising():
    masks = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    out = restrict_to_labels(masks, torch.tensor([[True, False]]), bg_pow=3)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.125, 0.3, 0.0]))   # no softmax, no renormalisation
    # a larger bg_pow shrinks the background: the foreground wins more pixels
    weak = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    assert restrict_to_labels(weak, torch.tensor([[True]]), 1).argmax(1).item() == 0
    assert restrict_to_labels(weak, torch.tensor([[True]]), 3).argmax(1).item() == 1


def test_crf_refine_equals_direct_pydensecrf():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    from semiseg_cli.engine.evaluate import crf_refine

    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 20, 24), generator=g, dtype=torch.uint8)
    probs = torch.rand(4, 20, 24, generator=g) * 0.5  # un-renormalised, as SLRNet's masked probabilities
    cfg = load_config(None, ["crf.iters=5"])
    got = crf_refine(image, probs, cfg).numpy()
    crf = dcrf.DenseCRF2D(24, 20, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.numpy())))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image.permute(1, 2, 0).numpy()), compat=10)
    assert np.allclose(got, np.array(crf.inference(5)).reshape(4, 20, 24), atol=1e-6)


@pytest.mark.parametrize("variant", ["wss", "semi_cls", "semi_nocls"])
def test_two_steps_of_each_variant_are_finite(variant):
    torch.manual_seed(0)
    cfg = load_config(None, [*SLR, f"slrnet.variant={variant}", "slrnet.pretrain_epochs=0"])
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step, has_mask in enumerate((torch.tensor([True, False]), torch.tensor([False, False]))):
        batch = fake_batch(("tagged",), n=2, size=48, num_classes=6, seed=step)
        batch["has_mask"] = has_mask  # the second batch: no pixel-labelled image (the original's NaN)
        ctx = SimpleNamespace(cfg=cfg, epoch=1, iteration=step, total=2, env=None, state=None)
        loss, logs = slrnet.train_step(model, batch, ctx)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values()), (variant, step, logs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.head.last_conv[-1].out_channels == (6 if variant == "semi_nocls" else 5)


def test_segmentation_loss_starts_after_the_pretrain_epochs():
    torch.manual_seed(0)
    # the variant without the class-count gate, no pixel-labelled image: only the late term can be non-zero
    cfg = load_config(None, [*SLR, "slrnet.variant=semi_nocls", "slrnet.pretrain_epochs=2",
                             "slrnet.loss_coeff=[0, 0, 0, 1]"])
    model = build_model(cfg)
    model.eval()  # no dropout / gate noise: the same outputs at both epochs
    batch = fake_batch(("tagged",), n=2, size=48, num_classes=6)
    batch["has_mask"] = torch.tensor([False, False])
    losses = [float(slrnet.train_step(model, batch, SimpleNamespace(cfg=cfg, epoch=e, iteration=0, total=1, env=None,
                                                                     state=None))[0]) for e in (2, 3)]
    assert losses[0] == 0 and losses[1] > 0  # `epoch > pretrain_epochs`, as the original


def test_train_eval_infer_and_the_two_stage_path_through_the_cli(tiny_root, synthetic_root, tmp_path, semiseg):
    run = tmp_path / "run"
    sets = [f"dataset.root={tiny_root}", *TINY, *SLR[2:], "train.iters=4", "train.eval_every=4",
            "train.keep_epochs=[0]", "eval.scales=[1.0, 0.5]", "eval.flip=true"]
    code, _, err = semiseg("train", "--recipe", "slrnet-synthetic", *[a for s in sets for a in ("--set", s)],
                           "--out", run)
    assert code == 0, err
    assert (run / "best.pt").is_file() and not (run / "epoch0.pt").exists()  # epoch 0 (6 its) not finished
    # given labels (from the val masks) + CRF: the mIoU of the same checkpoint differs from the predicted-label one
    code, out, err = semiseg("eval", "--checkpoint", run / "last.pt", "--json", "--set", "eval.image_labels=given",
                             "--set", "eval.crf=true")
    assert code == 0, err
    given = json.loads(out)
    assert 0 <= given["miou"] <= 100
    code, _, err = semiseg("infer", "--checkpoint", run / "last.pt", "--images", tiny_root / "images" / "00003.png",
                           "--out", tmp_path / "pred", "--crf")
    assert code == 0, err
    assert (tmp_path / "pred" / "00003.png").is_file()

    # two-stage: gen-pseudo with the given image labels and CRF writes a split, a supervised model trains on it
    from PIL import Image

    from semiseg_cli.data.image_labels import read_image_labels
    from semiseg_cli.data.splits import read_split

    view = tmp_path / "view"
    (view / "splits").mkdir(parents=True)
    for name in ("images", "masks", "classes.txt"):
        (view / name).symlink_to(tiny_root / name)
    (view / "splits" / "val.txt").write_text((tiny_root / "splits" / "val.txt").read_text())
    train_items = read_split(tiny_root / "splits" / "tiny" / "labeled.txt")
    (view / "train.txt").write_text("".join(f"{image}\n" for image, _ in train_items))
    code, out, err = semiseg("gen-pseudo", "--model", "checkpoint", "--checkpoint", run / "last.pt",
                             "--images", view / "train.txt", "--image-labels", synthetic_root / "image_labels.txt",
                             "--crf", "--out", view / "pseudo", "--list", view / "splits" / "pseudo" / "labeled.txt",
                             "--root", view)
    assert code == 0, err
    assert json.loads(out)["written"] == len(train_items)
    given = read_image_labels(synthetic_root / "image_labels.txt", 6)
    for image, _ in train_items:  # a pseudo-label holds only the background and the image's given classes
        stem = image.split("/")[-1][:-4]
        assert set(np.unique(np.array(Image.open(view / "pseudo" / f"{stem}.png")))) <= {0, *given[stem]}
    stage2 = tmp_path / "stage2"
    sets = [f"dataset.root={view}", *TINY, "dataset.split=pseudo", "train.iters=2", "train.eval_every=2"]
    code, _, err = semiseg("train", "--recipe", "supervised-synthetic", *[a for s in sets for a in ("--set", s)],
                           "--out", stage2)
    assert code == 0, err
    code, out, err = semiseg("eval", "--run", stage2, "--json")
    assert code == 0 and 0 <= json.loads(out)["miou"] <= 100, err


def test_keep_epochs_checkpoint_of_a_finished_epoch(tiny_root, tmp_path):
    run = tmp_path / "run"
    sets = [f"dataset.root={tiny_root}", *TINY, *SLR[2:], "train.iters=7", "train.eval_every=7", "train.keep_epochs=[0]"]
    run_cli("train", "--recipe", "slrnet-synthetic", *[a for s in sets for a in ("--set", s)], "--out", run, check=0)
    kept = torch.load(run / "epoch0.pt", weights_only=True)
    assert kept["iteration"] == 6  # the end of epoch 0 (24 tagged images, batch 4)


def test_the_slrnet_model_and_method_go_together():
    from semiseg_cli.errors import UserError

    for sets in (["model.name=slrnet"], ["method=slrnet"]):
        with pytest.raises(UserError, match="model.name=slrnet is trained by method=slrnet only"):
            load_config(None, sets)
