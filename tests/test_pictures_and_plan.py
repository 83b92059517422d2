"""What a user looks at after training: `semiseg plot`, every run's results.csv, eval's confusion matrix
(in eval.json, drawn by --confusion) with per-class accuracy and mAcc, overlays with an opacity and a
legend; and `train --dry-run`, which checks what a run would read and prints its plan without writing."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from semiseg_cli.plot import RESULT_COLUMNS
from tests.conftest import TINY, run_cli


def tiny_sets(root, *extra):
    return [a for s in [f"dataset.root={root}", *TINY, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def two_runs(tiny_root, tmp_path_factory):
    """A supervised and a UniMatch tiny run (6 iterations, evaluated at 3 and 6)."""
    base = tmp_path_factory.mktemp("runs")
    runs = []
    for recipe in ("supervised-synthetic", "unimatch-synthetic"):
        out = base / recipe
        run_cli("train", "--recipe", recipe, *tiny_sets(tiny_root, "train.iters=6", "train.eval_every=3"),
                "--out", out, check=0)
        runs.append(out)
    return runs


def test_every_run_writes_results_csv_one_row_per_evaluation(two_runs):
    for run in two_runs:
        with open(run / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert tuple(rows[0]) == RESULT_COLUMNS
        assert [int(r["iter"]) for r in rows] == [3, 6]
        log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
        evals = {r["iter"]: r for r in log if "miou" in r}
        train = {r["iter"]: r for r in log if "loss" in r}
        for r in rows:
            it = int(r["iter"])
            assert float(r["miou"]) == evals[it]["miou"] and float(r["loss"]) == train[it]["loss"]
            assert float(r["lr"]) == train[it]["lr"]
        # the pseudo-label kept ratio exists for UniMatch only
        assert (rows[0]["mask_ratio"] != "") == ("unimatch" in run.name)


def test_plot_draws_the_runs_curves_overlaid(semiseg, two_runs, tmp_path):
    out = tmp_path / "pics" / "curves.png"
    code, stdout, _ = semiseg("plot", *two_runs, "--out", out)
    assert code == 0
    result = json.loads(stdout)
    assert result["runs"] == [r.name for r in two_runs]
    # 6 logged iterations per run for loss and lr, UniMatch's 6 kept ratios, 2 evaluations per run
    assert result["points"] == {"training loss": 12, "learning rate": 12, "pseudo-label kept ratio": 6,
                                "val mIoU": 4}
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 500 and img.shape[1] > 800
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50      # drawn, not a blank canvas
    # one run: the picture goes into the run folder; several need --out
    assert semiseg("plot", two_runs[0])[0] == 0
    assert (two_runs[0] / "curves.png").stat().st_size > 10_000
    code, _, err = semiseg("plot", *two_runs)
    assert code == 2 and len(err) == 1 and "pass --out" in err[0]
    code, _, err = semiseg("plot", tmp_path, "--out", tmp_path / "x.png")
    assert code == 2 and "no log.jsonl" in err[0]


def test_eval_keeps_the_confusion_matrix_and_draws_it(semiseg, two_runs, tmp_path):
    run = two_runs[0]
    png = tmp_path / "confusion.png"
    code, stdout, _ = semiseg("eval", "--run", run, "--json", "--confusion", png)
    assert code == 0
    result = json.loads(stdout)
    conf = np.array(result["confusion"])
    assert conf.shape == (6, 6) and conf.sum() == 6 * 128 * 128      # every pixel of the 6 val images
    inter, gt = np.diag(conf), conf.sum(1)
    for c in range(6):
        acc = result["per_class_acc"][c]
        assert (acc is None) if gt[c] == 0 else acc == pytest.approx(100 * inter[c] / gt[c], abs=1e-3)
    assert result["macc"] == pytest.approx(np.mean(100 * inter[gt > 0] / gt[gt > 0]), abs=1e-3)
    assert result["pixel_acc"] == pytest.approx(100 * inter.sum() / conf.sum(), abs=1e-3)
    assert np.array(json.loads((run / "eval.json").read_text())["confusion"]).shape == (6, 6)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert min(img.shape[:2]) > 300 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    # the table prints accuracy next to IoU, and mAcc
    code, table, _ = semiseg("eval", "--run", run)
    assert code == 0 and "acc %" in table and "mAcc" in table


def test_overlay_opacity_background_and_legend(semiseg, two_runs, tiny_root, tmp_path):
    image = tiny_root / "images" / "01100.png"
    outs = {}
    for opacity in ("0", "0.6"):
        out = tmp_path / f"o{opacity}"
        assert semiseg("infer", "--checkpoint", two_runs[0] / "last.pt", "--images", image, "--out", out,
                       "--overlay", "--opacity", opacity)[0] == 0
        outs[opacity] = np.asarray(Image.open(out / "overlay" / "01100.png").convert("RGB"))
    mask = np.asarray(Image.open(tmp_path / "o0.6" / "01100.png"))
    src = np.asarray(Image.open(image).convert("RGB"))
    h, w = src.shape[:2]
    a, b = outs["0"], outs["0.6"]
    assert a.shape[0] >= h and a.shape[1] > w + 40                     # the legend beside the picture
    assert np.array_equal(a[:h, :w], src)                               # opacity 0: the image itself
    objects = mask > 0
    assert np.array_equal(b[:h, :w][~objects], src[~objects])           # background (drawn black) keeps the image
    if objects.any():
        assert not np.array_equal(b[:h, :w][objects], src[objects])
    legend = b[:, w:]
    assert len(np.unique(legend.reshape(-1, 3), axis=0)) > 3            # text and colour patches
    code, _, err = semiseg("infer", "--checkpoint", two_runs[0] / "last.pt", "--images", image, "--out",
                           tmp_path / "x", "--overlay", "--opacity", "1.5")
    assert code == 2 and len(err) == 1 and "--opacity" in err[0]


def test_dry_run_prints_the_plan_and_writes_nothing(semiseg, tiny_root, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = semiseg("train", "--recipe", "unimatch-synthetic", *tiny_sets(tiny_root, "train.iters=10",
                              "train.eval_every=4"), "--out", out, "--dry-run", "--json")
    assert code == 0
    plan = json.loads(stdout)
    assert plan["total_iters"] == 10 and plan["eval_at"] == [4, 8, 10]
    assert plan["images"] == {"val": 6, "labeled": 8, "unlabeled": 16, "unlabeled_mix": 16}  # (its CutMix partners)
    assert plan["per_process_batch"] == 4 and plan["iters_per_epoch"] == 4   # 16 unlabeled / batch 4
    assert not out.exists()
    code, text, _ = semiseg("train", "--recipe", "supervised-synthetic", *tiny_sets(tiny_root), "--out", out,
                            "--dry-run")
    assert code == 0
    assert "iterations: 3000 = 1500.0 epochs of 2 (8 images per epoch)" in text and "nothing written" in text
    assert not out.exists()


def test_dry_run_names_every_missing_file(semiseg, tiny_root, tmp_path):
    code, _, err = semiseg("train", "--recipe", "unimatch-synthetic",
                           *tiny_sets(tiny_root, f"model.weights={tmp_path / 'nope.pt'}", "model.backbone=resnet18",
                                      "dataset.split=missing"), "--out", tmp_path / "run", "--dry-run")
    assert code == 2 and len(err) == 1
    assert "nope.pt: model.weights file not found" in err[0]
    assert "no labeled list for synthetic split 'missing'" in err[0]
    assert "no unlabeled list for synthetic split 'missing'" in err[0]
    assert not (tmp_path / "run").exists()
