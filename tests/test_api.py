"""The Python API (semiseg_cli.load / predict / evaluate / train) from a fresh interpreter: the same results
as the CLI's infer, eval and train on a tiny synthetic run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import TINY, run_cli


def test_the_python_api_gives_the_cli_results(tiny_root, tmp_path):
    script = f"""
import json, sys
import numpy as np
from PIL import Image
import semiseg_cli
tiny = {TINY!r}
run = {str(tmp_path / "run")!r}
# a config dict over the defaults, then --set-style overrides
metrics = semiseg_cli.train({{"dataset": {{"root": {str(tiny_root)!r}}}, "train": {{"iters": 2, "eval_every": 2}}}}, out=run,
                            sets=tiny)
model = semiseg_cli.load(run + "/best.pt")
img_path = {str(tiny_root / "images" / "01100.png")!r}
mask, probs = model.predict(img_path)
pil_mask, _ = model.predict(Image.open(img_path))
arr_mask, _ = model.predict(np.asarray(Image.open(img_path).convert("RGB")))
np.save({str(tmp_path / "mask.npy")!r}, mask)
ev = semiseg_cli.evaluate(run + "/best.pt")
print(json.dumps({{"train": metrics["miou"], "eval": ev, "shape": list(probs.shape), "sum": float(probs.sum(0).mean()),
                  "same": bool((mask == pil_mask).all() and (mask == arr_mask).all()), "names": model.class_names}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and out["shape"] == [6, 128, 128] and abs(out["sum"] - 1) < 1e-4
    assert out["names"][0] == "background"
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "split: tiny" in saved and "resnet18" in saved
    # predict = `semiseg infer`, evaluate = `semiseg eval`
    run = tmp_path / "run"
    run_cli("infer", "--checkpoint", run / "best.pt", "--images", tiny_root / "images" / "01100.png",
            "--out", tmp_path / "preds", check=0)
    assert np.array_equal(np.load(tmp_path / "mask.npy"), np.asarray(Image.open(tmp_path / "preds" / "01100.png")))
    cli_eval = json.loads(run_cli("eval", "--checkpoint", run / "best.pt", "--json", check=0).stdout)
    assert out["eval"]["miou"] == cli_eval["miou"] == out["train"]


def test_predict_refuses_what_is_not_an_rgb_image(tiny_root, tmp_path):
    from semiseg_cli.api import Predictor
    from semiseg_cli.config import load_config
    from semiseg_cli.errors import UserError
    from semiseg_cli.models import build_model

    cfg = load_config("supervised-synthetic", [f"dataset.root={tiny_root}", *TINY])
    model = Predictor(cfg, build_model(cfg), "cpu")
    for bad in (np.zeros((4, 4), np.float32), 3.0):
        try:
            model.predict(bad)
        except UserError as e:
            assert "RGB uint8 array" in str(e)
        else:
            raise AssertionError(f"{type(bad).__name__} was accepted")
