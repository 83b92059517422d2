"""CLIP ViT conversion (openai-clip / open-clip), the MaskCLIP value-path backbone and the text embeddings,
checked against real, randomly initialised open_clip models (nothing is downloaded)."""
import json
import math
from concurrent.futures import ThreadPoolExecutor

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file as save_safetensors
from typer.testing import CliRunner

import semiseg_cli.models.text_embeddings as te
from semiseg_cli.cli import app
from semiseg_cli.errors import UserError
from semiseg_cli.models.clip_vit import MaskClipViT, freeze_for_spatial_finetuning, is_trainable, trainable_names
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt of open_clip to fetch weights or configs fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"open_clip tried to download: {a}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for mod, name in ((open_clip.factory, "download_pretrained"), (open_clip.factory, "download_pretrained_from_hf"),
                      (open_clip.openai, "download_pretrained_from_url")):
        monkeypatch.setattr(mod, name, refuse)


def cli(*args):
    """The real `convert-weights` command, in process (exit codes are tested with subprocesses below)."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def reference_value_path(visual, x, out_indices):
    """MaskCLIP's value path computed directly from open_clip's own modules: pad to a multiple of the
    patch, bicubically resize the positional grid, run open_clip's resblocks, and at the chosen blocks
    replace attention by W_o(W_v ln_1(x) + b_v) + b_o (spec §4b)."""
    p = visual.conv1.kernel_size[0]
    x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
    t = visual.conv1(x)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g = math.isqrt(pos.shape[0] - 1)
    if (h, w) != (g, g):
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.flatten(2)[0].t()])
    t = visual.ln_pre(torch.cat([visual.class_embedding.expand(t.shape[0], 1, -1), t], 1) + pos)
    blocks, skips = visual.transformer.resblocks, []
    for i, blk in enumerate(blocks):
        if i in out_indices or i == len(blocks) - 1:
            c = t.shape[-1]
            v = t + blk.attn.out_proj(F.linear(blk.ln_1(t), blk.attn.in_proj_weight[2 * c:], blk.attn.in_proj_bias[2 * c:]))
            v = (v + blk.mlp(blk.ln_2(v)))[:, 1:]
            if i in out_indices:
                skips.append(v.reshape(-1, h, w, c).permute(0, 3, 1, 2))
        t = blk(t)
    dense = F.normalize(visual.ln_post(v) @ visual.proj, dim=-1).reshape(-1, h, w, visual.proj.shape[1])
    glob = F.normalize(visual.ln_post(t[:, 0]) @ visual.proj, dim=-1)
    return skips, dense.permute(0, 3, 1, 2), glob


# --------------------------------------------------------------------------------------- ViT-B/16 parity

@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "quickgelu"])
def vit_b16(request, tmp_path_factory):
    """A random open_clip ViT-B-16 (GELU, or QuickGELU as OpenAI's), its state dict on disk, converted by
    the CLI (`--model-name` tells the activation, as an open_clip state dict does not)."""
    quick = request.param
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=quick).eval()
    tmp = tmp_path_factory.mktemp("vitb16")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp / "src.pt")
    extra = ["--model-name", "ViT-B-16-quickgelu"] if quick else []
    info = cli("convert-weights", "open-clip", tmp / "src.pt", tmp / "clip.pt", "-q", *extra)
    (tmp / "src.pt").unlink()
    return model, tmp / "clip.pt", quick, info


def test_vit_b16_global_and_dense_match_open_clip(vit_b16):
    model, dst, quick, info = vit_b16
    assert info["keys"] == 8 + 12 * 12 + 8 and info["sidecars"] == [str(dst.with_name("clip.text.pt"))]
    state = torch.load(dst, weights_only=True)
    assert int(state["meta.quick_gelu"]) == quick and state["pos_embed"].shape == (1, 197, 768)
    ours = MaskClipViT.from_file(dst, act="quick_gelu" if quick else "gelu", ln_eps=1e-5, img_size=224).eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = ours(x)
        skips, dense, glob = reference_value_path(model.visual, x, (0, 4))
        want = model.encode_image(x, normalize=True)
        assert torch.allclose(glob, want, atol=1e-5)  # the reference itself is right
        assert torch.allclose(out["global"], want, atol=1e-4)
        assert out["dense"].shape == (1, 512, 14, 14) and torch.allclose(out["dense"], dense, atol=1e-4)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out["skips"], skips))
        if quick:
            return  # the odd size once is enough
        x = torch.randn(1, 3, 200, 248)  # padded to 208 x 256: a 13 x 16 token grid, pos_embed resized
        out = ours(x)
        skips, dense, glob = reference_value_path(model.visual, x, (0, 4))
    assert out["dense"].shape == (1, 512, 13, 16) and torch.allclose(out["dense"], dense, atol=1e-4)
    assert [s.shape for s in out["skips"]] == [(1, 768, 13, 16)] * 2
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out["skips"], skips))
    assert torch.allclose(out["global"], glob, atol=1e-4)


def test_text_embeddings_match_encode_text_and_are_cached(vit_b16, monkeypatch):
    model, dst, quick, _ = vit_b16
    emb = te.text_embeddings(dst, ["cat", "dog"])
    tok = open_clip.get_tokenizer("ViT-B-16")
    names = ["cat", "dog"] + ([] if quick else ["sky", "wall"])  # sky, wall: for the concepts below
    with torch.no_grad():
        raw = model.encode_text(tok([f"a photo of a {c}" for c in names]))
    assert emb.shape == (2, 512) and torch.allclose(emb, F.normalize(raw[:2], dim=-1), atol=1e-4)
    assert len(list(dst.with_name("clip.text-cache").glob("*.pt"))) == 1
    if quick:
        return

    # class definitions: flat concepts + owner index, and SemiVL's conceptavg
    classes = [["sky", "wall"], "cat"]
    concepts, owner = te.concept_embeddings(dst, classes)
    raw = raw[[2, 3, 0]]  # sky, wall, cat
    assert owner.tolist() == [0, 0, 1] and torch.allclose(concepts, F.normalize(raw, dim=-1), atol=1e-4)
    avg, owner = te.concept_embeddings(dst, classes, average=True)
    want = F.normalize(torch.stack([raw[:2].mean(0), raw[2]]), dim=-1)
    assert owner.tolist() == [0, 1] and torch.allclose(avg, want, atol=1e-4)
    sim = torch.randn(2, 6, 3, 3)
    assert torch.equal(te.max_per_class(sim, torch.tensor([0, 0, 1, 2, 2, 2]), 3),
                       torch.stack([sim[:, :2].amax(1), sim[:, 2], sim[:, 3:].amax(1)], 1))

    # second calls come from the cache: the text tower is never rebuilt
    def no_rebuild(*a, **k):
        raise AssertionError("text tower rebuilt despite the cache")

    monkeypatch.setattr(te, "load_text_tower", no_rebuild)
    assert torch.equal(te.text_embeddings(dst, ["cat", "dog"]), emb)
    assert torch.equal(te.concept_embeddings(dst, classes, average=True)[0], avg)


# ------------------------------------------------------------------------- OpenAI TorchScript archives

def tiny_clip(seed=0) -> CLIP:
    """A tiny CLIP in the OpenAI layout; weights rounded to fp16 values, as OpenAI ships them (open_clip's
    OpenAI loader passes weights through fp16)."""
    torch.manual_seed(seed)
    model = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=True).eval()
    for p in model.parameters():
        p.data = p.data.half().float()
    return model


def save_openai_archive(model: CLIP, path) -> None:
    """A TorchScript archive shaped like OpenAI's: the causal mask is a plain attribute, and the state dict
    carries input_resolution / context_length / vocab_size."""
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(key, None)
        model.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.trace_module(model, {"encode_image": (torch.zeros(1, 3, 32, 32),)}), str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_archive_converts_like_its_state_dict(tmp_path):
    model = tiny_clip()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "openclip.pt")
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        want = model.encode_image(F.interpolate(x, size=(32, 32)), normalize=True)
        _, dense_want, _ = reference_value_path(model.visual, x, (0,))
    save_openai_archive(model, tmp_path / "ViT-tiny.pt")

    info = cli("convert-weights", "openai-clip", tmp_path / "ViT-tiny.pt", tmp_path / "a.pt")
    cli("convert-weights", "open-clip", tmp_path / "openclip.pt", tmp_path / "b.pt", "-q", "--model-name", "ViT-B-16-quickgelu")
    torch.save({**sd, "input_resolution": torch.tensor(32)}, tmp_path / "openai_sd.pt")  # a non-TorchScript OpenAI file
    cli("convert-weights", "openai-clip", tmp_path / "openai_sd.pt", tmp_path / "c.pt", "-q")
    save_safetensors(sd, tmp_path / "open_clip_model.safetensors")  # the open_clip files on the HF hub
    cli("convert-weights", "open-clip", tmp_path / "open_clip_model.safetensors", tmp_path / "d.pt", "-q",
        "--model-name", "ViT-B-16-quickgelu")
    assert info["backbone"].startswith("MaskClipViT (width 64, 2 layers, 1 heads, patch 16, grid 2x2, embed 32)")
    a, *others = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abcd")
    assert all(set(a) == set(o) and all(torch.equal(a[k], o[k]) for k in a) for o in others)
    assert torch.equal(a["proj.weight"], sd["visual.proj"].t()) and torch.equal(a["cls_token"][0, 0], sd["visual.class_embedding"])
    assert torch.equal(a["blocks.1.mlp.fc2.weight"], sd["visual.transformer.resblocks.1.mlp.c_proj.weight"])
    ta, tb = (torch.load(tmp_path / f"{n}.text.pt", weights_only=True) for n in "ab")
    assert int(ta["meta.quick_gelu"]) == 1 and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert set(ta) - {"meta.quick_gelu"} == {k for k in sd if not k.startswith("visual.")}

    # the tiny converted model reproduces open_clip (QuickGELU, eps 1e-5); built at another grid, the
    # positional embedding is resized at load exactly as on the fly
    vit = MaskClipViT.from_file(tmp_path / "a.pt", act="quick_gelu", ln_eps=1e-5, img_size=32, out_indices=(0,)).eval()
    vit64 = MaskClipViT.from_file(tmp_path / "a.pt", act="quick_gelu", ln_eps=1e-5, img_size=(48, 64), out_indices=(0,)).eval()
    with torch.no_grad():
        assert torch.allclose(vit(F.interpolate(x, size=(32, 32)))["global"], want, atol=1e-5)
        out, out64 = vit(x), vit64(x)
    assert torch.allclose(out["dense"], dense_want, atol=1e-5)
    assert all(torch.allclose(out[k], out64[k], atol=1e-5) for k in ("dense", "global"))


# ------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_are_one_line_user_errors(tmp_path):
    from semiseg_cli.convert import convert

    model = tiny_clip()
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "visual.ln_post.bias"}, tmp_path / "missing.pt")
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pt")
    with ThreadPoolExecutor(2) as pool:  # two real CLI processes at once (their start-up dominates)
        missing, resnet = pool.map(lambda a: run_cli("convert-weights", *a, tmp_path / "x.pt", "-q"),
                                   [("open-clip", tmp_path / "missing.pt"), ("openai-clip", tmp_path / "resnet.pt")])
    for proc, text in ((missing, "missing target keys (e.g. ln_post.bias)"), (resnet, "not a CLIP ViT checkpoint")):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and text in lines[0], proc.stderr
    assert not (tmp_path / "x.pt").exists()

    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"garbage.pt: (not a readable PyTorch file|refused to load)"):
        convert("openai-clip", str(tmp_path / "garbage.pt"), tmp_path / "x.pt", quiet=True)
    torch.save({"state_dict": {**sd, "visual.extra.weight": torch.zeros(3)}}, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="unused source keys"):
        convert("open-clip", str(tmp_path / "extra.pt"), tmp_path / "x.pt", quiet=True)
    with pytest.raises(UserError, match="not an open_clip model config.*did you mean"):
        convert("open-clip", str(tmp_path / "extra.pt"), tmp_path / "x.pt", quiet=True, model_name="ViT-B-16-quickgel")
    with pytest.raises(UserError, match="--model-name does not apply"):
        convert("torchvision-resnet", str(tmp_path / "resnet.pt"), tmp_path / "x.pt", model_name="ViT-B-16")

    # converted files: a missing key, or weights of another architecture
    torch.save(sd, tmp_path / "ok_src.pt")
    convert("open-clip", str(tmp_path / "ok_src.pt"), tmp_path / "ok.pt", quiet=True, model_name="ViT-B-16-quickgelu")
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "blocks.1.ln2.weight"}, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"broken.pt: does not fit MaskClipViT: 1 missing keys \(e.g. blocks.1.ln2.weight\)"):
        MaskClipViT.from_file(tmp_path / "broken.pt", out_indices=(0,))
    with pytest.raises(UserError, match="the weights are for width = 64"):
        MaskClipViT(width=128, layers=2, heads=2, embed_dim=32, out_indices=(0,)).load_converted(state)

    # the text sidecar is missing (a visual-only file converted to the same DST removes the stale one):
    # the message names the command that writes it
    torch.save({k: v for k, v in sd.items() if k.startswith("visual.")}, tmp_path / "visual_only.pt")
    info = convert("open-clip", str(tmp_path / "visual_only.pt"), tmp_path / "ok.pt", quiet=True)
    assert "sidecars" not in info and not (tmp_path / "ok.text.pt").exists()
    with pytest.raises(UserError, match=r"ok.text.pt: CLIP text weights not found; `semiseg convert-weights` writes them beside "
                                        r".*ok.pt \(e.g. `semiseg convert-weights openai-clip ViT-B-16.pt .*ok.pt`"):
        te.text_embeddings(tmp_path / "ok.pt", ["cat"])


# ----------------------------------------------------------------------------- tiny model, trainable set

def test_tiny_config_shapes_amp_and_spatial_finetuning():
    torch.manual_seed(0)
    vit = MaskClipViT(width=64, layers=3, heads=2, embed_dim=32, img_size=64, out_indices=(0, 1))
    out = vit(torch.randn(2, 3, 50, 81))  # not multiples of 16, not square: 4 x 6 tokens
    assert [s.shape for s in out["skips"]] == [(2, 64, 4, 6)] * 2 and out["dense"].shape == (2, 32, 4, 6)
    assert out["dense"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out["dense"].norm(dim=1), torch.ones(2, 4, 6)) and out["global"].shape == (2, 32)

    n = freeze_for_spatial_finetuning(vit)
    assert n == 3 * (192 * 64 + 192 + 64 * 64 + 64) + 17 * 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit(torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last))
        loss = out["dense"].float().sum() + sum(s.float().mean() for s in out["skips"])
    loss.backward()
    assert all((p.grad is not None) == is_trainable(name) for name, p in vit.named_parameters())
    assert vit.blocks[0].attn.in_proj_weight.grad.abs().sum() > 0 and vit.pos_embed.grad.abs().sum() > 0

    # ViT-B/16 at crop 512 (shapes only): exactly Q/K/V/out of 12 blocks + the 1025-entry pos_embed
    with torch.device("meta"):
        big = MaskClipViT(img_size=512)
    names = trainable_names(big)
    params = dict(big.named_parameters())
    assert sum(params[n].numel() for n in names) == 29_135_616 == 12 * (2304 * 768 + 2304 + 768 * 768 + 768) + 1025 * 768
    assert len(names) == 1 + 12 * 4 and all(".attn." in n for n in names if n != "pos_embed")
