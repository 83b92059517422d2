import json
import math

import numpy as np
import pytest
import torch

from semiseg_cli.config import load_config
from semiseg_cli.distributed import DistEnv
from semiseg_cli.data.streams import fake_batch
from semiseg_cli.engine.trainer import StepContext, load_method
from semiseg_cli.methods import METHODS
from semiseg_cli.methods.fixmatch import cutmix, mix_targets, unsup_ce
from semiseg_cli.methods.prevmatch import POOL_DIR, PrevModelPool, guidance_weight
from semiseg_cli.methods.s4mc import (BETA, S4MCState, masked_percentile, neighbour_agreement, refine,
                                      s4mc_filter)
from semiseg_cli.models.deeplabv3plus import DeepLabV3Plus


def method_state(method, cfg, model, tmp_path):
    """The state a method's make_state would build, made without a dataset: PrevMatch's pool holding one
    stored model (so its guidance terms run), S4MC's E_c."""
    if method == "prevmatch":
        pool = PrevModelPool(cfg, model, tmp_path, DistEnv())
        pool.after_eval(model, True, 0)
        return pool
    if method == "s4mc":
        return S4MCState(torch.full((6,), 0.98))
    return None


# SemiVL needs its own model and guidance state: tests/test_semivl.py; SLRNet its own model: tests/test_slrnet.py;
# SimSeg its model and caption pairs: tests/test_simseg_train.py
@pytest.mark.parametrize("method,extra", [(m, []) for m in METHODS if m not in ("semivl", "slrnet", "simseg")] + [("s4mc", ["ssl.s4mc_base=unimatch"])])
def test_two_train_steps_give_finite_losses_and_gradients(method, extra, tmp_path):
    torch.manual_seed(0)
    # tau 0: every pixel contributes
    cfg = load_config(None, [f"method={method}", "ssl.conf_thresh=0.0", "ssl.prev_conf_thresh=0.0", *extra])
    model = DeepLabV3Plus("resnet18", 6, head_channels=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    module = load_method(method)
    state = method_state(method, cfg, model, tmp_path)
    for step in range(2):
        batch = {k: v for k, v in fake_batch(seed=step).items()}
        loss, logs = module.train_step(model, batch, StepContext(cfg, step + 1, 4, DistEnv(), state))
        if method == "prevmatch":
            assert float(logs["loss_prev"]) > 0
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
    assert model.training  # the eval-mode pseudo-label pass puts the model back in train mode
    if method == "s4mc":  # the filter dropped some pixels and kept others
        assert 0 < float(logs["mask_ratio"]) < 1


def test_cutmix_uses_the_same_box_for_images_labels_confidences_and_ignore():
    box = torch.zeros(1, 4, 5)
    box[0, 1:3, 2:4] = 1
    img, img_mix = torch.zeros(1, 3, 4, 5), torch.ones(1, 3, 4, 5)
    mixed = cutmix(img, img_mix, box)
    assert torch.equal(mixed[0, 0], box[0]) and torch.equal(mixed[0, 2], box[0])
    label, label_mix = torch.full((1, 4, 5), 2), torch.full((1, 4, 5), 7)
    conf, conf_mix = torch.full((1, 4, 5), 0.5), torch.full((1, 4, 5), 0.9)
    ign, ign_mix = torch.zeros(1, 4, 5, dtype=torch.long), torch.full((1, 4, 5), 255)
    l, c, i = mix_targets(box, label, conf, ign, label_mix, conf_mix, ign_mix)
    inside = box.bool()
    assert (l[inside] == 7).all() and (l[~inside] == 2).all()
    assert (c[inside] == 0.9).all() and (c[~inside] == 0.5).all()
    assert (i[inside] == 255).all() and (i[~inside] == 0).all()


def test_unsup_loss_divides_by_non_padded_pixels():
    logits = torch.zeros(1, 2, 2, 2)  # CE = log 2 everywhere
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    conf = torch.tensor([[[0.99, 0.5], [0.99, 0.99]]])
    ign = torch.tensor([[[0, 0], [0, 255]]])
    # confident and not padded: 2 pixels; non-padded: 3 pixels (UniMatch's denominator)
    assert float(unsup_ce(logits, label, conf >= 0.95, ign)) == pytest.approx(2 * math.log(2) / 3)


# ---- S4MC ----------------------------------------------------------------------------------------------

VOC_E01 = torch.tensor([0.998089, 0.986050])  # the official Pascal E_c of classes 0 and 1


def direct_refine(prob, e, offsets):
    """p~_c(x) = p_c + b q_c - b max(p_c q_c, p_c E_c), q_c = max over in-image neighbours (0 if none)."""
    b, k, h, w = prob.shape
    out = torch.empty_like(prob)
    for n in range(b):
        for c in range(k):
            for y in range(h):
                for x in range(w):
                    nb = [prob[n, c, y + dy, x + dx].item() for dy, dx in offsets if 0 <= y + dy < h and 0 <= x + dx < w]
                    q = max(nb + [0.0])
                    p = prob[n, c, y, x].item()
                    out[n, c, y, x] = p + BETA * q - BETA * max(p * q, p * e[c].item())
    return out


def test_s4mc_refinement_reproduces_the_specs_worked_example():
    # two pixels side by side: each is the other's only neighbour
    prob = torch.tensor([[0.6, 0.9], [0.4, 0.1]]).view(1, 2, 1, 2)
    refined = refine(prob, VOC_E01)
    assert refined[0, :, 0, 0].tolist() == pytest.approx([0.783, 0.221], abs=1e-3)
    prob = torch.tensor([[0.6, 0.1], [0.4, 0.9]]).view(1, 2, 1, 2)  # the neighbour flips the argmax
    assert refine(prob, VOC_E01)[0, :, 0, 0].tolist() == pytest.approx([0.297, 0.707], abs=1e-3)


@pytest.mark.parametrize("neighbourhood", [4, 8])
def test_s4mc_refinement_equals_the_formula_on_a_hand_made_map(neighbourhood):
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 3, 4, 5, generator=g).softmax(1)
    e = torch.tensor([0.99, 0.95, 0.83])
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbourhood == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    assert torch.allclose(refine(prob, e, neighbourhood), direct_refine(prob, e, offsets), atol=1e-6)


def test_masked_percentile_equals_numpy():
    g = torch.Generator().manual_seed(1)
    values, valid = torch.rand(3, 7, 9, generator=g), torch.rand(3, 7, 9, generator=g) > 0.3
    for q in (0.0, 12.5, 40.0, 77.7, 100.0):
        assert float(masked_percentile(values, valid, q)) == pytest.approx(np.percentile(values[valid].numpy(), q), abs=1e-6)


def test_s4mc_filter_keeps_pixels_whose_refined_margin_beats_the_percentile():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 6, 6, generator=g) * 3
    ign = torch.zeros(2, 6, 6, dtype=torch.long)
    ign[:, :, -1] = 255
    e = torch.tensor([0.99, 0.97, 0.9])
    cfg = load_config(None, ["method=s4mc"])
    kept = []
    for t, alpha in ((0, 40.0), (50, 20.0), (100, 0.0)):
        label, keep = s4mc_filter(logits, ign, StepContext(cfg, t, 100, DistEnv(), S4MCState(e)))
        prob = logits.softmax(1)
        top = prob.topk(2, 1).values
        gamma = np.percentile((top[:, 0] - top[:, 1])[ign != 255].numpy(), alpha)
        top_r = direct_refine(prob, e, [(-1, 0), (1, 0), (0, -1), (0, 1)]).topk(2, 1).values
        assert torch.equal(keep, (top_r[:, 0] - top_r[:, 1]) > float(gamma))
        assert torch.equal(label, prob.argmax(1))  # the label is the unrefined argmax
        kept.append(int(keep[ign != 255].sum()))
    assert kept[0] < kept[1] < kept[2]  # the dropped share shrinks as alpha_t goes to 0


def test_neighbour_agreement_counts_same_class_neighbours():
    mask = np.array([[0, 0, 1],
                     [0, 0, 1],
                     [255, 0, 1]])
    e = neighbour_agreement([mask], 3)
    # class 0: 5 pixels, valid neighbour pairs 13, same-class 10; class 1: 3 pixels, 7 pairs, 4 same
    assert e[0].item() == pytest.approx(10 / 13) and e[1].item() == pytest.approx(4 / 7)
    assert e[2].item() == pytest.approx((10 / 13 + 4 / 7) / 2)  # unseen class: mean of the seen ones


# ---- PrevMatch -----------------------------------------------------------------------------------------

def test_prevmatch_weight_rises_and_falls():
    assert [guidance_weight(t, 80) for t in (0, 20, 40, 60, 80)] == pytest.approx([0, 0.5, 1, 0.5, 0])


def test_prevmatch_guidance_uses_only_stored_models_with_weights_summing_to_one(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, ["method=prevmatch", "ssl.prev_pool_size=3"])
    model = DeepLabV3Plus("resnet18", 6, head_channels=16)
    pool = PrevModelPool(cfg, model, tmp_path, DistEnv())
    images = torch.randn(2, 3, 32, 32)
    snapshots = []
    for it in range(5):  # five improvements into a pool of three, plus one evaluation without improvement
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        pool.after_eval(model, True, it)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    pool.after_eval(model, False, 5)
    assert len(pool.models) == 3 and pool.files == ["iter00000002.pt", "iter00000003.pt", "iter00000004.pt"]
    assert sorted(p.name for p in (tmp_path / POOL_DIR).iterdir()) == pool.files  # evicted files deleted

    with torch.no_grad():  # changing the live model must not change the guidance
        for p in model.parameters():
            p.mul_(0)
    reference = DeepLabV3Plus("resnet18", 6, head_channels=16).eval()
    seen = set()
    for it in range(40):
        picked, weights = pool.draw(it)
        assert 1 <= len(picked) <= 3 and len(set(picked)) == len(picked) and all(0 <= i < 3 for i in picked)
        assert sum(weights) == pytest.approx(1.0) and all(w > 0 for w in weights)
        seen.add(len(picked))
        if it < 3:
            expected = 0
            for i, w in zip(picked, weights):
                reference.load_state_dict(snapshots[2 + i])
                with torch.no_grad():
                    expected = expected + w * reference(images)
            assert torch.allclose(pool.guidance(images, it), expected, atol=1e-5)
    assert seen == {1, 2, 3}

    restored = PrevModelPool(cfg, DeepLabV3Plus("resnet18", 6, head_channels=16), tmp_path, DistEnv())
    restored.load_state_dict(pool.state_dict())
    assert torch.equal(restored.guidance(images, 7), pool.guidance(images, 7))


def test_s4mc_trains_through_the_cli_with_e_estimated_from_the_labeled_masks(tiny_root, tmp_path):
    from tests.conftest import TINY, run_cli

    sets = [f"dataset.root={tiny_root}", *TINY, "method=s4mc", "ssl.s4mc_base=unimatch", "train.iters=2"]
    proc = run_cli("train", "--recipe", "supervised-synthetic", *[a for s in sets for a in ("--set", s)],
                   "--out", tmp_path / "run", check=0)
    assert "E_c estimated from 8 labeled masks" in proc.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert 0 < logged[0]["mask_ratio"] < 1  # alpha_0 = 40 %: the filter drops part of the batch
