"""MaskCLIP zero-shot (models/maskclip.py): dense logits against open_clip's own modules in both settings,
prompt denoising and key smoothing against a hand computation, and `eval --recipe maskclip-voc20` on the
real VOC samples without a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from semiseg_cli.models.clip_vit import MaskClipViT, clip_renorm
from semiseg_cli.models.maskclip import MaskCLIP, refine
from tests.conftest import run_cli
from tests.test_clip import reference_value_path


def tiny_clip(quick: bool) -> CLIP:
    torch.manual_seed(0)
    return CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=64),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=quick).eval()


@pytest.mark.parametrize("setting", ["mmseg-port", "clip"])
def test_dense_logits_equal_open_clips_value_path(setting, tmp_path):
    """mmseg port: exact GELU, LN eps 1e-6, ImageNet-normalised input; CLIP's: QuickGELU, 1e-5, CLIP's."""
    quick = setting == "clip"
    clip = tiny_clip(quick)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    weights = tmp_path / "clip_tiny.pt"
    run_cli("convert-weights", "open-clip", tmp_path / "clip.pt", weights, "--quiet",
            *(["--model-name", "ViT-B-16-quickgelu"] if quick else []), check=0)
    act, eps = ("quick_gelu", 1e-5) if quick else ("gelu", 1e-6)
    vit = MaskClipViT.from_file(weights, act=act, ln_eps=eps, out_indices=())
    text = F.normalize(torch.randn(5, 32), dim=-1)
    model = MaskCLIP(vit, text, torch.tensor([0, 1, 1, 2, 3]), 4, clip_input=quick)
    if not quick:  # the port's numerics on open_clip's own modules
        for m in clip.visual.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-6
        for blk in clip.visual.transformer.resblocks:
            blk.mlp.gelu = torch.nn.GELU()
    x = torch.randn(2, 3, 72, 96)  # 72 is not a multiple of the patch: padded, upsampled, cropped
    with torch.no_grad():
        _, dense, _ = reference_value_path(clip.visual, clip_renorm(x) if quick else x, ())
        sim = torch.einsum("bchw,nc->bnhw", dense, text)
        per_class = torch.stack([sim[:, 0], sim[:, 1:3].amax(1), sim[:, 3], sim[:, 4]], 1)
        up = F.interpolate(per_class, size=(80, 96), mode="bilinear", align_corners=False)[..., :72, :]
        torch.testing.assert_close(model(x), 100 * up, atol=1e-4, rtol=1e-4)


def test_prompt_denoising_and_key_smoothing_match_a_hand_computation():
    torch.manual_seed(1)
    o = torch.randn(1, 3, 2, 2) * 0.01
    o[0, 0, 0] += 0.1  # class 0 wins the top row, class 1 the bottom row
    o[0, 1, 1] += 0.1
    o[0, 2] -= 0.1     # class 2 never wins anywhere: PD removes it
    keys = torch.randn(1, 4, 5)
    # PD by hand
    prob = (100 * o).softmax(1)
    pd = o.clone()
    for c in range(3):
        if prob[0, c].max() < 0.5:
            pd[0, c] = -100.0
    assert (pd[0, 2] == -100).all() and not (pd[0, :2] == -100).any()
    torch.testing.assert_close(refine(o, keys, 0.5, 0.0), pd)
    # KS by hand (after PD), with ks_thresh 1.0: every position is smoothed
    p = (100 * pd).softmax(1).reshape(3, 4)                       # [K, hw]
    kn = keys[0] / keys[0].norm(dim=0, keepdim=True)              # normalised over positions (dim=1 of [B, hw, C])
    w = kn @ kn.T
    want = torch.stack([sum(w[i, j] * p[:, j] for j in range(4)) for i in range(4)], 1).reshape(1, 3, 2, 2)
    torch.testing.assert_close(refine(o, keys, 0.5, 1.0), want)
    # a low ks_thresh leaves confident positions as probabilities
    kept = refine(o, keys, 0.0, 1e-9)
    torch.testing.assert_close(kept, (100 * o).softmax(1))


def test_eval_maskclip_voc20_without_a_checkpoint_on_the_real_voc_samples(tmp_path, shared_data):
    clip = tiny_clip(False)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    weights = tmp_path / "weights" / "clip_tiny.pt"
    run_cli("convert-weights", "open-clip", tmp_path / "clip.pt", weights, "--quiet", check=0)
    root = tmp_path / "voc"
    root.mkdir()
    src = shared_data / "voc_samples"
    stems = sorted(p.name[: -len("_image.png")] for p in src.glob("*_image.png"))
    for s in stems:
        for kind in ("image", "label"):
            (root / f"{s}_{kind}.png").symlink_to(src / f"{s}_{kind}.png")
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("".join(f"{s}_image.png {s}_label.png\n" for s in stems))
    proc = run_cli("eval", "--recipe", "maskclip-voc20", "--set", f"model.weights={weights}", "--set",
                   f"dataset.root={root}", "--set", "train.workers=0", "--json", check=0)
    result = json.loads(proc.stdout)
    assert result["images"] == 14 and result["num_classes"] == 20 and result["class_names"][0] == "airplane"
    assert 0 <= result["miou"] <= 100 and result["mode"] == "whole"
    # a model that needs training refuses to evaluate from a recipe alone
    bad = run_cli("eval", "--recipe", "supervised-synthetic")
    assert bad.returncode == 2 and "must be trained first" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
