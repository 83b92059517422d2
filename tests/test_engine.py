import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.config import load_config
from semiseg_cli.engine.evaluate import confusion, metrics, predict
from tests.conftest import TINY, run_cli


def tiny_args(root, *extra):
    sets = [f"dataset.root={root}", *TINY, *extra]
    return [a for s in sets for a in ("--set", s)]


def test_miou_equals_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    k = 7
    target = torch.randint(0, k - 1, (4, 50, 60), generator=g)  # class 6 never in the target...
    target[:, :5] = 255
    pred = torch.randint(0, k - 2, (4, 50, 60), generator=g)  # ...nor 5, 6 in the prediction
    pred[target == 1] = 1  # make IoUs differ between classes
    conf = confusion(pred, target, k)
    ours = metrics(conf, [str(i) for i in range(k)])
    tm = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="none")(pred, target)
    present = [i for i in range(k) if (pred[target != 255] == i).any() or (target == i).any()]
    assert ours["per_class_iou"][6] is None
    for c in present:
        assert ours["per_class_iou"][c] == pytest.approx(float(tm[c]) * 100, abs=1e-3)
    macro = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")(pred, target)
    assert ours["miou"] == pytest.approx(float(macro) * 100, abs=1e-3)
    assert ours["miou_paper"] == pytest.approx(float(tm[present].sum()) * 100 / k, abs=1e-3)


@pytest.mark.parametrize("mode", ["slide", "slide_sum"])
def test_sliding_windows_equal_whole_image_for_a_pointwise_model(mode):
    model = torch.nn.Conv2d(3, 5, 1)
    cfg = load_config(None, [f"eval.mode={mode}", "eval.crop=32", "eval.stride=20", "dataset.name=synthetic"])
    cfg["dataset"]["num_classes"] = 5
    x = torch.randn(2, 3, 45, 71)
    whole = model(x)
    out = predict(model, x, cfg)
    ref = whole if mode == "slide" else whole.softmax(1)
    if mode == "slide_sum":  # summed probabilities: compare the argmax and the normalised scores
        out = out / out.sum(1, keepdim=True)
    assert torch.allclose(out, ref, atol=1e-5)
    cfg["eval"].update(scales=[0.5, 1.0], flip=True)
    assert predict(model, x, cfg).shape == (2, 5, 45, 71)


def test_train_eval_infer_cli(tiny_root, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root, "train.iters=4", "train.eval_every=2"),
                   "--out", run, check=0)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run"] == str(run)
    for name in ("config.yaml", "log.jsonl", "last.pt", "best.pt", "eval.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert sum("miou" in r for r in records) == 2
    saved = (run / "config.yaml").read_text()
    assert "world_size: 1" in saved and "per_gpu_batch: 4" in saved
    # a second train into the same folder refuses instead of overwriting
    again = run_cli("train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root), "--out", run, check=2)
    assert "--resume" in again.stderr

    ev = json.loads(run_cli("eval", "--run", run, "--json", check=0).stdout)
    for key in ("miou", "miou_paper", "per_class_iou", "pixel_acc", "num_classes", "class_names", "images", "mode"):
        assert key in ev
    assert ev["images"] == 6 and ev["num_classes"] == 6
    assert ev == {k: v for k, v in json.loads((run / "eval.json").read_text()).items() if k in ev}
    table = run_cli("eval", "--run", run, check=0).stdout
    assert "mIoU" in table and "triangle" in table

    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("00001.png", "00002.png"):
        (images / f"a{name}").symlink_to(tiny_root / "images" / name)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "preds"
    proc = run_cli("infer", "--checkpoint", run / "best.pt", "--images", images, "--out", out, "--overlay", check=2)
    assert "broken.png" in proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["a00001.png", "a00002.png"]
    pred = Image.open(out / "a00001.png")
    assert pred.mode == "P" and pred.size == (128, 128) and np.array(pred).max() < 6
    assert (out / "overlay" / "a00001.png").is_file()


def test_infer_crf_equals_direct_pydensecrf(tiny_root, tmp_path):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.models import build_model
    from semiseg_cli.data.transforms import normalize, to_uint8_tensor

    run = tmp_path / "run"
    run_cli("train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root, "train.iters=2", "train.eval_every=2"),
            "--out", run, check=0)
    out = tmp_path / "crf"
    image_path = tiny_root / "images" / "00003.png"
    run_cli("infer", "--checkpoint", run / "last.pt", "--images", image_path, "--out", out, "--crf",
            "--set", "crf.iters=5", "--set", "crf.bilateral_srgb=20", check=0)
    ckpt = load_checkpoint(run / "last.pt")
    cfg = ckpt["config"]
    cfg["model"]["weights"] = None
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    image = np.array(Image.open(image_path).convert("RGB"))
    with torch.no_grad():
        probs = model(normalize(to_uint8_tensor(Image.fromarray(image))[None])).softmax(1)[0].numpy()
    crf = dcrf.DenseCRF2D(128, 128, 6)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=20, rgbim=np.ascontiguousarray(image), compat=10)
    expected = np.array(crf.inference(5)).reshape(6, 128, 128).argmax(0)
    assert np.array_equal(np.array(Image.open(out / "00003.png")), expected)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


RESUME_EXTRA = {
    "supervised": [],
    "prevmatch": ["ssl.prev_pool_size=2", "ssl.prev_conf_thresh=0.0"],
    # a random tiny ViT: the guidance encoder (a copy of the initial backbone) must come back from the checkpoint
    "semivl": ["model.name=semivl", "model.backbone=clip-vit-tiny", "optim.name=adamw", "optim.lr=0.0004",
               "ssl.guidance_conf=0.0"],
}


@pytest.mark.parametrize("method", list(RESUME_EXTRA))
def test_sigkill_then_resume_gives_the_uninterrupted_weights(method, tiny_root, tmp_path):
    # 8 iterations, checkpoints every 2. PrevMatch: its pool of previous best models (filled at the first
    # evaluation) must come back from prev_models/ on resume, or the guidance terms, and the weights, differ.
    extra = RESUME_EXTRA[method]
    args = tiny_args(tiny_root, f"method={method}", "train.iters=8", "train.eval_every=2", *extra)
    full = tmp_path / "full"
    run_cli("train", "--recipe", "supervised-synthetic", *args, "--out", full, check=0)

    part = tmp_path / "part"
    cmd = [sys.executable, "-m", "semiseg_cli", "train", "--recipe", "supervised-synthetic", *args, "--out", str(part)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (part / "last.pt").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = torch.load(part / "last.pt", weights_only=True)["iteration"]
    assert first < 8, "the run finished before it could be killed"
    run_cli("train", "--out", part, "--resume", check=0)
    a, b = _weights(full / "last.pt"), _weights(part / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "prevmatch":
        pool = torch.load(part / "last.pt", weights_only=True)["method_state"]["files"]
        assert 1 <= len(pool) <= 2 and all((part / "prev_models" / f).is_file() for f in pool)
        logged = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
        assert any(r.get("loss_prev", 0) > 0 for r in logged)  # the guidance terms were trained on


def test_nonfinite_loss_stops_with_last_good_checkpoint(tiny_root, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--recipe", "supervised-synthetic",
                   *tiny_args(tiny_root, "train.iters=6", "train.eval_every=1", "optim.lr=1e12"), "--out", run, check=2)
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_torchrun_two_processes_eval_equals_single_process(tiny_root, tmp_path):
    run = tmp_path / "ddp"
    env = {"OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semiseg_cli"]
    train = subprocess.run(base + ["train", "--recipe", "supervised-synthetic",
                                   *tiny_args(tiny_root, "train.iters=2", "train.eval_every=2"), "--out", str(run)],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "world_size: 2" in (run / "config.yaml").read_text()
    # torchrun's own parser takes `--run` for an abbreviation of its --run-path: pass --checkpoint
    ddp = subprocess.run(base + ["eval", "--checkpoint", str(run / "best.pt"), "--json"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = json.loads(run_cli("eval", "--run", run, "--json", check=0).stdout)
    assert json.loads(ddp.stdout) == single
    # an odd global batch does not divide over 2 processes: one clear line, exit 2
    bad = subprocess.run(base + ["train", "--recipe", "supervised-synthetic",
                                 *tiny_args(tiny_root, "train.global_batch=3"), "--out", str(tmp_path / "odd")],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert bad.returncode != 0 and "does not divide over 2 processes" in bad.stderr


def test_evaluating_more_often_does_not_change_the_trained_weights(tiny_root, tmp_path):
    # UniMatch draws feature-perturbation dropout from the global RNG; evaluation must not consume it
    for every in (1, 4):
        run_cli("train", "--recipe", "supervised-synthetic",
                *tiny_args(tiny_root, "method=unimatch", "train.iters=4", f"train.eval_every={every}",
                           "train.workers=1"), "--out", tmp_path / f"every{every}", check=0)
    a, b = _weights(tmp_path / "every1" / "last.pt"), _weights(tmp_path / "every4" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
