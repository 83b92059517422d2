"""SemiOVS (methods/semiovs.py, the `ood` stream): the OOD sample, its visiting rules, the loss of each base
re-stated by hand from specs/semiovs_sed.md §1.3 on a fixed batch with a deterministic model, the forward
passes, the recipes, and training through the real CLI (one process and two torchrun processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from semiseg_cli.config import load_config
from semiseg_cli.data.dataset import SegDataset
from semiseg_cli.data.splits import read_split, write_split
from semiseg_cli.data.streams import fake_batch, stream_index
from semiseg_cli.distributed import DistEnv
from semiseg_cli.engine.trainer import RunSampler, StepContext
from semiseg_cli.methods import semiovs
from tests.conftest import REPO, TINY, run_cli

REPO_SPLITS = REPO / "data" / "splits"

K = 4  # classes of the hand-made batch


# ----------------------------------------------------------------------------- the OOD sample and stream


def test_ood_sample_is_augmented_as_unlabeled_and_ignores_padding_and_255(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    mask = rng.integers(0, 3, (40, 60), dtype=np.uint8)
    mask[:5, :5] = 255  # pixels the labeler left unlabeled (--ignore-below)
    Image.fromarray(mask).save(tmp_path / "a_m.png")
    items = [("a.png", "a_m.png")]
    kw = dict(num_classes=3, crop_size=48, seed=3)
    u = SegDataset(tmp_path, items, "train_u", **kw)
    o = SegDataset(tmp_path, items, "train_u_ood", **kw)
    for key in [(0, 0, 0), (1, 5, 0), (2, 9, 0)]:
        u_w, u_s1, u_s2, ign_u, _, _ = u[key]
        o_w, o_y, o_s1, o_s2, o_ign = o[key]
        assert torch.equal(u_w, o_w) and torch.equal(u_s1, o_s1) and torch.equal(u_s2, o_s2)  # same crop, flip, views
        assert ((ign_u == 255) <= (o_ign == 255)).all()             # every padded pixel is ignored ...
        assert (o_y[o_ign == 255] == 0).all() and (o_y < 3).all()  # ... and reads a valid class index
    # the 255 pixels of the label become ignore (not only padding): without padding and flip, at scale 1
    o_plain = SegDataset(tmp_path, items, "train_u_ood", num_classes=3, crop_size=40, scale_range=(1.0, 1.0), seed=0)
    found = False
    for pos in range(20):
        _, y, _, _, ign = o_plain[(0, pos, 0)]
        found |= bool(((ign == 255) & (y == 0)).any()) and int((ign == 255).sum()) >= 25
    assert found


def test_ood_visiting_three_epochs_tiling_and_resume():
    epoch_len, seed = 8, 11
    env = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))

    def keys(n_items, start, total):
        return list(RunSampler(epoch_len, 0, env, 2, epoch_len // 2, start, total, items=n_items, stream_seed=seed))

    # N_ood = 3 N_u: three epochs visit every OOD image exactly once
    three = keys(24, 0, 12)
    assert sorted(k[2] for k in three) == list(range(24))
    # N_ood < N_u: tiled
    tiled = keys(3, 0, 4)
    assert {k[2] for k in tiled} == {0, 1, 2} and all(k[2] == k[1] % 3 for k in tiled)
    # resume at iteration 5 continues at the same OOD keys
    assert keys(24, 5, 12) == three[5 * 2:]
    # the shuffled mix source: its own permutation, a different image at most positions, every image once
    own = [stream_index(0, p, epoch_len, epoch_len, seed, own_order=True) for p in range(epoch_len)]
    assert sorted(own) == list(range(epoch_len)) and own != list(range(epoch_len))


# ----------------------------------------------------------------------------- the loss, by hand


class Recorder(nn.Module):
    """A deterministic segmenter: logits = 1x1 conv; its FP output = the logits of the half-scaled input.
    Records every forward (batch size, need_fp, training mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, K, 1)
        self.calls = []

    def forward(self, x, need_fp=False):
        self.calls.append((x.shape[0], need_fp, self.training))
        out = self.conv(x)
        return (out, self.conv(0.5 * x)) if need_fp else out


def hand_batch(n=2, size=16):
    b = fake_batch(("labeled", "unlabeled", "unlabeled_mix", "ood"), n=n, size=size, num_classes=K, seed=3)
    b["o_y"] = torch.randint(0, K, (n, size, size), generator=torch.Generator().manual_seed(5))
    b["o_ign"][:, :2] = 255  # OOD padding rows
    return b


def ce_map(logits, label):
    return F.cross_entropy(logits, label, reduction="none")


def consistency(logits, label, keep, ign):
    """sum(CE . keep . [ign != 255]) / count(ign != 255)  (pixelwise mode, tau in keep)."""
    valid = (ign != 255).float()
    return (ce_map(logits, label) * keep.float() * valid).sum() / valid.sum()


def expected_loss(model, b, cfg, lam, prev_logits=None, lam_t=0.0, mc=None):
    """specs/semiovs_sed.md §1.3 re-stated with plain tensors."""
    tau = cfg["ssl"]["conf_thresh"]
    box1, box2 = b["box1"].bool(), b["box2"].bool()
    with torch.no_grad():
        p_mix = model.conv(b["u_w_mix"]).softmax(1)
        p_u = model.conv(b["u_w"]).softmax(1)
    conf_mix, y_mix = p_mix.max(1)
    conf_u, y_u = p_u.max(1)
    paste = lambda dst, src, box: torch.where(box[:, None] if dst.dim() == 4 else box, src, dst)  # noqa: E731
    u_s1, u_s2 = paste(b["u_s1"], b["u_s1_mix"], box1), paste(b["u_s2"], b["u_s2_mix"], box2)
    o_s1, o_s2 = paste(b["o_s1"], b["u_s1"], box1), paste(b["o_s2"], b["u_s2"], box2)  # unmixed ID views
    # in-distribution (UniMatch)
    l_x = F.cross_entropy(model.conv(b["x"]), b["y"], ignore_index=255)
    terms = []
    for view, box in ((u_s1, box1), (u_s2, box2)):
        label = torch.where(box, y_mix, y_u)
        keep = torch.where(box, conf_mix >= tau, conf_u >= tau)
        ign = torch.where(box, b["ign_mix"], b["ign"])
        terms.append(consistency(model.conv(view), label, keep, ign))
    l_fp = consistency(model.conv(0.5 * b["u_w"]), y_u, conf_u >= tau, b["ign"])
    l_id = l_x + 0.25 * terms[0] + 0.25 * terms[1] + 0.5 * l_fp
    # out-of-distribution: the OVS label outside the box (always kept), the ID weak label inside
    ood = []
    for view, box in ((o_s1, box1), (o_s2, box2)):
        label = torch.where(box, y_u, b["o_y"])
        keep = torch.where(box, conf_u >= tau, torch.ones_like(box))
        ign = torch.where(box, b["ign"], b["o_ign"])
        ood.append(consistency(model.conv(view), label, keep, ign))
    o_fp = consistency(model.conv(0.5 * b["o_w"]), b["o_y"], torch.ones_like(box1), b["o_ign"])
    l_ood = lam * (0.25 * ood[0] + 0.25 * ood[1] + 0.5 * o_fp)
    if prev_logits is not None:  # PrevMatch guidance, ID only
        conf_p, y_p = prev_logits.softmax(1).max(1)
        keep_p = conf_p >= cfg["ssl"]["prev_conf_thresh"]
        n = b["u_w"].shape[0]
        yp, yp_mix, kp, kp_mix = y_p[:n], y_p[n:], keep_p[:n], keep_p[n:]
        prev = []
        for view, box in ((u_s1, box1), (u_s2, box2)):
            ign = torch.where(box, b["ign_mix"], b["ign"])
            prev.append(consistency(model.conv(view), torch.where(box, yp_mix, yp), torch.where(box, kp_mix, kp), ign))
        l_prev = 0.25 * prev[0] + 0.25 * prev[1] + 0.5 * consistency(model.conv(0.5 * b["u_w"]), yp, kp, b["ign"])
        return (l_id + lam_t * l_prev + l_ood) / (2 + lam_t + lam)
    total = (l_id + l_ood) / (2 + lam)
    if mc is not None:  # SemiVL's MaskCLIP guidance, ID only, outside the normalisation, mean over all pixels
        m, m_mix, lam_mc = mc
        mean_all = lambda logits, lab: F.cross_entropy(logits, lab, ignore_index=255, reduction="sum") / lab.numel()  # noqa: E731
        total = total + lam_mc * (0.25 * mean_all(model.conv(u_s1), torch.where(box1, m_mix, m))
                                  + 0.25 * mean_all(model.conv(u_s2), torch.where(box2, m_mix, m))
                                  + 0.5 * mean_all(model.conv(0.5 * b["u_w"]), m))
    return total


def ctx_for(cfg, state=None, iteration=10, total=40):
    return StepContext(cfg, iteration, total, DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu")), state)


def cfg_for(base, lam):
    cfg = load_config(None, ["method=semiovs", f"ssl.ood_base={base}", f"ssl.ood_weight={lam}", "ssl.conf_thresh=0.3",
                             "ssl.prev_conf_thresh=0.3"])
    cfg["dataset"]["num_classes"] = K
    return cfg


def test_unimatch_base_loss_equals_the_spec_and_makes_three_forwards_after_the_mix_one():
    model, b = Recorder(), hand_batch()
    cfg = cfg_for("unimatch", 1.0)
    loss, logs = semiovs.train_step(model, b, ctx_for(cfg))
    torch.testing.assert_close(loss, expected_loss(model, b, cfg, 1.0))
    # the mix source in eval mode, then [x, u_w, o_w] with FP, [u_s1, u_s2], [o_s1, o_s2]
    assert model.calls == [(2, False, False), (6, True, True), (4, False, True), (4, False, True)]
    assert {"loss_ood", "loss_fp_ood", "loss_x", "mask_ratio"} <= set(logs)


def test_prevmatch_base_guides_in_distribution_only_and_uses_2_plus_lambda_while_the_pool_is_empty(tmp_path):
    from semiseg_cli.methods.prevmatch import PrevModelPool, guidance_weight

    model, b = Recorder(), hand_batch()
    cfg = cfg_for("prevmatch", 1.0)
    env = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    pool = PrevModelPool(cfg, model, tmp_path, env)
    loss, _ = semiovs.train_step(model, b, ctx_for(cfg, pool))
    torch.testing.assert_close(loss, expected_loss(model, b, cfg, 1.0))           # empty pool: / (2 + lambda)
    pool.after_eval(model, improved=True, iteration=1)                            # one previous model
    with torch.no_grad():
        model.conv.weight.add_(0.3)  # the live model moves on; the pool keeps the old copy
        prev_logits = pool.models[0].conv(torch.cat([b["u_w"], b["u_w_mix"]]))
    model.calls.clear()
    loss, logs = semiovs.train_step(model, b, ctx_for(cfg, pool, iteration=10, total=40))
    lam_t = guidance_weight(10, 40)
    torch.testing.assert_close(loss, expected_loss(model, b, cfg, 1.0, prev_logits=prev_logits, lam_t=lam_t))
    assert "loss_prev" in logs and len(model.calls) == 4  # the pool's forward is not the live model's


def test_semivl_base_lambda_half_and_maskclip_guidance_on_in_distribution_data_only():
    model, b = Recorder(), hand_batch()
    cfg = cfg_for("semivl", 0.5)
    g = torch.Generator().manual_seed(9)
    m_all = torch.randint(0, K, (4, 16, 16), generator=g)
    m_all[:, :3] = 255

    class Guide:  # stands in for the frozen MaskCLIP encoder (tested in test_semivl.py)
        seen = None

        def labels(self, images, ign, conf):
            Guide.seen = images
            return m_all

    loss, logs = semiovs.train_step(model, b, ctx_for(cfg, Guide(), iteration=10, total=40))
    lam_mc = cfg["ssl"]["guidance_weight"] * (1 - 10 / 40)
    expected = expected_loss(model, b, cfg, 0.5, mc=(m_all[:2], m_all[2:], lam_mc))
    torch.testing.assert_close(loss, expected)
    assert torch.equal(Guide.seen, torch.cat([b["u_w"], b["u_w_mix"]]))  # no OOD image gets MaskCLIP labels
    assert "loss_mc" in logs


# ----------------------------------------------------------------------------- recipes


def test_semiovs_recipes_resolve_with_the_spec_values():
    listed = run_cli("recipes", check=0).stdout
    for base in ("unimatch", "prevmatch", "semivl"):
        for split in ("92", "183", "366", "732", "1464"):
            name = f"semiovs-{base}-voc-{split}"
            assert name in listed
            cfg = load_config(name)
            assert cfg["method"] == "semiovs" and cfg["ssl"]["ood_base"] == base and cfg["dataset"]["split"] == split
            assert cfg["ssl"]["conf_thresh"] == 0.95 and cfg["train"]["epochs"] == 80
            assert cfg["dataset"]["ood_list"] and cfg["dataset"]["ood_root"]
            if base == "semivl":
                assert cfg["ssl"]["ood_weight"] == 0.5 and cfg["train"]["global_batch"] == 4
                assert cfg["model"]["name"] == "semivl" and cfg["ssl"]["mix_source"] == "same"
            else:
                assert cfg["ssl"]["ood_weight"] == 1.0 and cfg["train"]["global_batch"] == 8
                assert cfg["train"]["amp"] == "fp16" and cfg["ssl"]["mix_source"] == "shuffled"
                assert cfg["train"]["crop_size"] == 321 and cfg["optim"]["lr"] == 0.001


# ----------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def ood_root(tiny_root, tmp_path_factory):
    """12 out-of-distribution synthetic images (`render_ood`) with pseudo-labels written by gen-pseudo from a
    2-iteration supervised checkpoint, through `--list`: the semiovs-synthetic pipeline at test size."""
    from semiseg_cli.data.synthetic import OOD_LIST, generate_ood

    d = tmp_path_factory.mktemp("ood")
    run = d / "sup"
    run_cli("train", "--recipe", "supervised-synthetic", *[a for s in (f"dataset.root={tiny_root}", *TINY,
            "train.iters=2", "train.eval_every=2") for a in ("--set", s)], "--out", run, check=0)
    assert generate_ood(d, count=12) == (12, 0) and generate_ood(d, count=12) == (0, 12)
    run_cli("gen-pseudo", "--model", "checkpoint", "--checkpoint", run / "best.pt", "--images", d / OOD_LIST,
            "--out", d / "pseudo", "--list", d / "ood.txt", "--root", d, check=0)
    assert len(read_split(d / "ood.txt")) == 12
    return d


def semiovs_args(tiny_root, ood_root, *extra):
    return [a for s in (f"dataset.root={tiny_root}", *TINY, "method=semiovs", f"dataset.ood_list={ood_root / 'ood.txt'}",
                        f"dataset.ood_root={ood_root}", *extra) for a in ("--set", s)]


@pytest.mark.parametrize("base,mix", [("unimatch", "shuffled"), ("prevmatch", "same")])
def test_semiovs_trains_through_the_cli(tiny_root, ood_root, tmp_path, base, mix):
    run = tmp_path / base
    run_cli("train", "--recipe", "supervised-synthetic",
            *semiovs_args(tiny_root, ood_root, f"ssl.ood_base={base}", f"ssl.mix_source={mix}", "train.iters=3",
                          "train.eval_every=2"), "--out", run, check=0)
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss_ood" in r]
    assert steps and all(np.isfinite(r["loss"]) and np.isfinite(r["loss_ood"]) for r in steps)
    if base == "prevmatch":
        assert any("loss_prev" in r for r in logs)  # the improving evaluation at 2 filled the pool


def test_semiovs_without_an_ood_list_is_one_line(tiny_root, tmp_path):
    proc = run_cli("train", "--recipe", "supervised-synthetic",
                   *[a for s in (f"dataset.root={tiny_root}", *TINY, "method=semiovs") for a in ("--set", s)],
                   "--out", tmp_path / "r")
    assert proc.returncode == 2 and "dataset.ood_list" in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_two_processes_train_semiovs_and_eval_equals_single_process(tiny_root, ood_root, tmp_path):
    """The original's OOD loader exists only in its single-process branch (DDP crashes); here DDP trains."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semiseg_cli"]
    train = subprocess.run(base + ["train", "--recipe", "supervised-synthetic",
                                   *semiovs_args(tiny_root, ood_root, "train.iters=2", "train.eval_every=2"),
                                   "--out", str(run)], capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    ddp = subprocess.run(base + ["eval", "--checkpoint", str(run / "best.pt"), "--json"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads(ddp.stdout) == json.loads(run_cli("eval", "--run", run, "--json", check=0).stdout)


# ----------------------------------------------------------------------------- Pascal Context-60


def test_prepare_context_links_checked_files_idempotently(shared_data, tmp_path):
    from semiseg_cli.data.dataset import build_dataset

    val = read_split(REPO_SPLITS / "context" / "val.txt")[:3]
    lab = read_split(REPO_SPLITS / "context" / "1_32" / "labeled.txt")[:2]
    src = tmp_path / "download" / "VOCdevkit" / "VOC2010"
    sample = Image.open(shared_data / "voc_samples" / "0_image.png").convert("RGB")
    rng = np.random.default_rng(0)
    for image, mask in val + lab:
        (src / image).parent.mkdir(parents=True, exist_ok=True)
        (src / mask).parent.mkdir(parents=True, exist_ok=True)
        sample.save(src / image)
        Image.fromarray(rng.integers(0, 60, (sample.height, sample.width), dtype=np.uint8)).save(src / mask)
    root = tmp_path / "context"
    args = ("prepare-data", "context", "--src", tmp_path / "download", "--root", root, "--allow-partial")
    first = json.loads(run_cli(*args, check=0).stdout)
    assert first["written"] == 10 and first["files_listed"] == 4996 * 2 + 5104 * 2
    assert json.loads(run_cli(*args, check=0).stdout)["written"] == 0
    assert (root / val[0][1]).resolve() == (src / val[0][1]).resolve()
    cfg = load_config(None, ["dataset.name=context", f"dataset.root={root}", "dataset.split=1_32"])
    assert cfg["dataset"]["num_classes"] == 60
    ds = build_dataset(cfg, "val")
    ds.items = [it for it in ds.items if (root / it[0]).exists()]
    _, y, _ = ds[0]
    assert y.max() < 60
    # a mask with a label outside 0..59 is one line naming it, and nothing of it is linked
    bad_img, bad_mask = read_split(REPO_SPLITS / "context" / "val.txt")[5]
    sample.save(src / bad_img)
    Image.fromarray(np.full((sample.height, sample.width), 70, np.uint8)).save(src / bad_mask)
    proc = run_cli(*args)
    assert proc.returncode == 2 and bad_mask.split("/")[-1] in proc.stderr and "[70]" in proc.stderr
    assert not (root / bad_mask).exists()


def test_context_recipes_resolve():
    listed = run_cli("recipes", check=0).stdout
    for split in ("1_32", "1_16", "1_8", "1_4", "1_2"):
        for name in (f"unimatch-context-{split}", f"semiovs-unimatch-context-{split}", f"semiovs-prevmatch-context-{split}"):
            assert name in listed
            cfg = load_config(name)
            assert cfg["dataset"]["name"] == "context" and cfg["dataset"]["num_classes"] == 60
            assert cfg["train"]["crop_size"] == 321 and cfg["train"]["epochs"] == 80 and cfg["optim"]["lr"] == 0.001
        assert load_config(f"semiovs-prevmatch-context-{split}")["ssl"]["ood_base"] == "prevmatch"


def test_prepare_synthetic_ood_makes_another_distribution_of_the_same_classes(tmp_path, monkeypatch):
    from semiseg_cli.data import synthetic
    from semiseg_cli.data.prepare import prepare

    monkeypatch.setattr(synthetic, "NUM_OOD", 6)
    summary = prepare("synthetic-ood", None, tmp_path / "ood")
    assert summary["written"] == 6 and prepare("synthetic-ood", None, tmp_path / "ood")["written"] == 0
    lines = (tmp_path / "ood" / synthetic.OOD_LIST).read_text().splitlines()
    assert lines == [f"images/ood{i:05d}.png" for i in range(6)]
    ood = [synthetic.render_ood(0, i) for i in range(6)]
    ind = [synthetic.render(0, i) for i in range(6)]
    assert all(m.max() >= 1 and m.max() < len(synthetic.SYNTHETIC_CLASSES) for _, m in ood)  # the same classes
    assert min(int(im.min()) for im, _ in ood) >= 70 > min(int(im.min()) for im, _ in ind)  # another colour regime
    assert not any(np.array_equal(a[0], b[0]) for a, b in zip(ood, ind))
