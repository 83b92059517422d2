"""SED (models/sed.py, convert/sed.py, `gen-pseudo --model sed`) against open_clip's own modules and against
the formulas of specs/semiovs_sed.md §2, on a tiny ConvNeXt CLIP saved in SED's checkpoint layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semiseg_cli.models import sed as S
from tests.conftest import run_cli

TINY = {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128], "embed_dim": 32, "mlp_hidden": 64, "prompt_channel": 80,
        "hidden_dim": 32, "decoder_dims": [32, 16, 16], "guidance_proj_dims": [8, 4, 4], "kernel_sizes": [5, 5, 5],
        "num_heads": 4}
CLIP = "sem_seg_head.predictor.clip_model."
AGG = "sem_seg_head.predictor.transformer."


def tiny_open_clip(monkeypatch=None):
    """open_clip's own CLIP (TimmModel 'convnext_large' with pool '' and an MLP head, a 1-layer text tower),
    its ConvNeXt made tiny by injecting depths / dims into timm.create_model."""
    import open_clip
    import timm

    real = timm.create_model

    def tiny(name, *args, **kwargs):
        kwargs.setdefault("depths", tuple(TINY["depths"]))
        kwargs.setdefault("dims", tuple(TINY["dims"]))
        return real(name, *args, **kwargs)

    timm.create_model = tiny
    try:
        torch.manual_seed(0)
        model = open_clip.CLIP(TINY["embed_dim"], {"timm_model_name": "convnext_large", "timm_pool": "",
                                                   "timm_proj": "mlp", "image_size": 64},
                               {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1})
    finally:
        timm.create_model = real
    for p in model.parameters():  # away from the initial values (LayerNorms at 1/0, zero biases)
        p.data.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def sed_checkpoint(path, clip, drop=None, extra=None):
    """SED's released layout: detectron2 {"model": ...}, DDP `module.` prefixes, CLIP under
    sem_seg_head.predictor.clip_model., a random aggregator under sem_seg_head.predictor.transformer."""
    torch.manual_seed(1)
    agg = S.SED(TINY).transformer.state_dict()
    sd = {f"module.{CLIP}{k}": v for k, v in clip.state_dict().items()}
    sd.update({f"module.{AGG}{k}": v + 0.01 * torch.randn_like(v) for k, v in agg.items()})
    if drop:
        sd.pop(drop)
    sd.update(extra or {})
    torch.save({"model": sd, "iteration": 80000}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("sed")
    clip = tiny_open_clip()
    src = sed_checkpoint(d / "sed_model_tiny.pth", clip)
    proc = run_cli("convert-weights", "sed", src, d / "sed.pt", "-v", check=0)
    return {"clip": clip, "weights": d / "sed.pt", "src": src, "log": proc.stderr, "info": json.loads(proc.stdout)}


# ----------------------------------------------------------------------------- converter


def test_convert_uses_every_key_and_records_the_architecture(converted):
    clip, info = converted["clip"], converted["info"]
    n_src = len(clip.state_dict()) + 115 - 0  # the tiny aggregator has SED-L's 115 tensors too
    assert f"{n_src} source keys" in converted["log"]
    # the whole prefix decides: the CLIP text tower's `.transformer.` keys go to the sidecar, not the aggregator
    assert f"{CLIP}transformer.resblocks.0.attn.in_proj_weight -> text:transformer.resblocks.0.attn.in_proj_weight" \
        in converted["log"]
    assert f"{AGG}decoder1.cnext.dwconv.weight -> transformer.decoder1.cnext.dwconv.weight" in converted["log"]
    state = torch.load(converted["weights"], weights_only=True)
    assert {k: state[f"meta.{k}"].tolist() for k in S.ARCH_KEYS} == TINY
    model = S.SED.from_file(converted["weights"])
    assert model.arch == TINY
    text = torch.load(info["sidecars"][0], weights_only=True)
    assert int(text["meta.quick_gelu"]) == 0 and "token_embedding.weight" in text and "logit_scale" in text


@pytest.mark.parametrize("case", ["missing", "extra"])
def test_convert_a_missing_or_extra_key_exits_2_naming_it(converted, tmp_path, case):
    if case == "missing":
        src = sed_checkpoint(tmp_path / "bad.pth", converted["clip"], drop=f"module.{AGG}decoder2.up.bias")
        name = "transformer.decoder2.up.bias"
    else:
        src = sed_checkpoint(tmp_path / "bad.pth", converted["clip"],
                             extra={"module.sem_seg_head.predictor.extra_proj.weight": torch.zeros(3)})
        name = "sem_seg_head.predictor.extra_proj.weight"
    proc = run_cli("convert-weights", "sed", src, tmp_path / "out.pt", "-q")
    assert proc.returncode == 2 and name in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3 and not (tmp_path / "out.pt").exists()


def test_sed_l_has_the_released_key_layout():
    """SED-L: 543 open_clip convnext_large_d_320 tensors (345 visual, same names and shapes as ours) + the 115
    aggregator tensors (1,473,164 parameters), checked against open_clip itself (specs §2.1, §2.6)."""
    import open_clip

    from semiseg_cli.models.text_embeddings import is_text_key

    with torch.device("meta"):
        clip = open_clip.create_model("convnext_large_d_320", pretrained=None, device="meta")
        ours = S.SED(S.SED_L)
    ref, mine = clip.state_dict(), ours.state_dict()
    assert len(ref) == 543
    assert {k: v.shape for k, v in ref.items() if k.startswith("visual.")} == \
        {k: v.shape for k, v in mine.items() if k.startswith("visual.")}
    assert all(is_text_key(k) for k in ref if not k.startswith("visual."))
    agg = {k: v for k, v in mine.items() if k.startswith("transformer.")}
    assert len(agg) == 115 and sum(v.numel() for v in agg.values()) == 1_473_164
    assert len(ref) + len(agg) == 658
    # the table of §2.6: transposed-conv outputs, concat widths, GroupNorm groups
    t = ours.transformer
    for i, (up_out, concat, out, groups) in enumerate([(96, 160, 64, 4), (48, 80, 32, 2), (24, 40, 16, 1)], 1):
        d = getattr(t, f"decoder{i}")
        assert d.up.out_channels == up_out and d.conv.double_conv[0].in_channels == concat
        assert d.conv.double_conv[3].out_channels == out
        assert d.conv.double_conv[1].num_groups == d.conv.double_conv[4].num_groups == groups
        assert d.cnext.dwconv.kernel_size == (9, 9)
    assert [p[0].out_channels for p in t.decoder_corr_guidance_projection] == [32, 16, 8]
    assert [p[0].in_channels for p in t.decoder_guidance_projection] == [768, 384, 192]


# ----------------------------------------------------------------------------- dense features, text


def test_dense_features_equal_open_clip_trunk_and_head(converted):
    """clip_vis_dense = the vendored TimmModel.forward(dense=True): trunk stages, norm_pre, then trunk.head and
    head applied to every res5 pixel as a 1 x 1 image, computed here with open_clip's own modules."""
    visual = converted["clip"].visual
    model = S.SED.from_file(converted["weights"])
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        ours = model.visual(x)
        y = visual.trunk.stem(x)
        for i in range(4):
            y = visual.trunk.stages[i](y)
            torch.testing.assert_close(ours[f"res{i + 2}"], y, atol=1e-5, rtol=1e-5)
        y = visual.trunk.norm_pre(y)
        b, c, h, w = y.shape
        pix = y.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        ref = visual.head(visual.trunk.head(pix)).view(b, h, w, -1).permute(0, 3, 1, 2)
    assert ours["dense"].shape == (2, TINY["embed_dim"], 4, 5)
    torch.testing.assert_close(ours["dense"], ref, atol=1e-5, rtol=1e-5)


def test_text_ensemble_equals_encode_text_per_template_with_synonym_averaging(converted, shared_data):
    """SEDPredictor.class_embeddings re-stated with open_clip's encode_text: a concept string is split on ', ',
    prompts template-major, each L2-normalised, mean over synonyms per template, re-normalised."""
    import open_clip

    from semiseg_cli.models.prompts import templates
    from semiseg_cli.models.text_embeddings import template_embeddings

    sed_templates = json.loads((shared_data / "semiovs/SED/sed/third_party/imagenet_templates.extracted.json")
                               .read_text())["IMAGENET_TEMPLATES"]
    assert list(templates("imagenet80")) == sed_templates
    concepts = ["sky", "aeroplane, airplane, glider", "tv, monitor, standalone screen"]
    clip = converted["clip"]
    ref = []
    with torch.no_grad():
        for c in concepts:
            parts = c.split(", ")
            e = clip.encode_text(open_clip.tokenize([t.format(p) for t in sed_templates for p in parts]))
            e = e / e.norm(dim=-1, keepdim=True)
            if len(parts) > 1:
                e = e.reshape(len(sed_templates), len(parts), -1).mean(1)
                e = e / e.norm(dim=-1, keepdim=True)
            ref.append(e)
    ours = template_embeddings(converted["weights"], [c.split(", ") if ", " in c else c for c in concepts],
                               templates("imagenet80"))
    assert ours.shape == (3, 80, TINY["embed_dim"])
    torch.testing.assert_close(ours, torch.stack(ref), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- aggregator blocks


def test_linear_attention_equals_the_explicit_kernel_sum():
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 7, 4, 8, dtype=torch.float64) for _ in range(3))
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    a = torch.einsum("nlhd,nshd->nlsh", phi_q, phi_k)                 # kernel between concept l and s
    explicit = torch.einsum("nlsh,nshd->nlhd", a, v) / (a.sum(2)[..., None] + 1e-6)
    torch.testing.assert_close(S.linear_attention(q, k, v), explicit)


def test_class_layer_at_inference_counts_its_input_twice():
    """Pooling 1 x 1: x + (x + delta), delta = attention across concepts + MLP, per pixel."""
    torch.manual_seed(0)
    layer = S.ClassTransformerLayer(16, 4).double()
    x = torch.randn(2 * 5, 16, 3, 4, dtype=torch.float64)            # (B T) C H W, T = 5
    with torch.no_grad():
        out = layer(x, 5)
        tokens = x.view(2, 5, 16, 3, 4).permute(0, 3, 4, 1, 2)        # B H W T C
        n = layer.norm1(tokens)
        heads = [p(n).view(*n.shape[:-1], 4, 4) for p in (layer.attention.q, layer.attention.k, layer.attention.v)]
        phi_q, phi_k = F.elu(heads[0]) + 1, F.elu(heads[1]) + 1
        a = torch.einsum("bhwlnd,bhwsnd->bhwlsn", phi_q, phi_k)
        att = (torch.einsum("bhwlsn,bhwsnd->bhwlnd", a, heads[2]) / (a.sum(4)[..., None] + 1e-6)).flatten(-2)
        y = tokens + att
        y = y + layer.MLP(layer.norm2(y))
        expected = x + y.permute(0, 3, 4, 1, 2).reshape(10, 16, 3, 4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("size", [768, 384])
def test_output_shapes_and_permutation_equivariance_over_concepts(size):
    torch.manual_seed(0)
    model = S.SED(TINY).eval()
    x, text = torch.randn(2, 3, size, size), torch.randn(6, 80, TINY["embed_dim"])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        out = model(x, text)
        out_perm = model(x, text[perm])
    assert out.shape == (2, 6, size // 4, size // 4)
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-4, rtol=1e-4)


def test_a_wrong_template_count_is_a_clear_error():
    from semiseg_cli.errors import UserError

    with pytest.raises(UserError, match="80 prompt templates per concept"):
        S.SED(TINY)(torch.randn(1, 3, 64, 64), torch.randn(3, 85, TINY["embed_dim"]))


# ----------------------------------------------------------------------------- pre-processing


def test_shortest_edge_resize_as_detectron2():
    assert S.shortest_edge_size(500, 375) == (853, 640)           # 640 / 375 * 500 = 853.33
    assert S.shortest_edge_size(375, 500) == (640, 853)
    assert S.shortest_edge_size(640, 427) == (959, 640)           # 958.80 -> int(x + 0.5) = 959
    assert S.shortest_edge_size(100, 2000) == (128, 2560)         # the long side capped at 2560
    assert S.shortest_edge_size(853, 640) == (853, 640)


def test_sed_input_step_by_step(shared_data):
    img = Image.open(shared_data / "voc_samples" / "0_image.png").convert("RGB")
    w, h = img.size
    nw, nh = S.shortest_edge_size(w, h)
    step1 = np.asarray(img.resize((nw, nh), Image.BILINEAR), dtype=np.float32)   # PIL bilinear, as detectron2
    step2 = (step1 - np.array(S.CLIP_MEAN_255, np.float32)) / np.array(S.CLIP_STD_255, np.float32)
    step3 = F.interpolate(torch.from_numpy(step2).permute(2, 0, 1)[None], size=(768, 768), mode="bilinear",
                          align_corners=False)[0]
    ours = S.sed_input(img)
    assert ours.shape == (3, 768, 768) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, step3, atol=1e-5, rtol=1e-5)
    assert min(nw, nh) == 640


# ----------------------------------------------------------------------------- gen-pseudo --model sed


@pytest.fixture(scope="module")
def voc_images(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("voc")
    (d / "images").mkdir()
    for p in sorted((shared_data / "voc_samples").glob("*_image.png")):
        (d / "images" / p.name).symlink_to(p)
    return d


def test_gen_pseudo_sed_on_the_real_voc_samples(converted, voc_images, tmp_path):
    out = voc_images / "sed-labels"
    proc = run_cli("gen-pseudo", "--model", "sed", "--weights", converted["weights"], "--classes", "sed_voc21",
                   "--images", voc_images / "images", "--out", out, "--save-scores", "--input-size", "64",
                   "--list", voc_images / "ood.txt", "--root", voc_images, "--batch-size", "4", check=0)
    summary = json.loads(proc.stdout)
    images = sorted((voc_images / "images").iterdir())
    assert summary["written"] == len(images) == 14 and summary["failed"] == 0
    assert list(summary["class_histogram"])[:2] == ["background", "aeroplane"]
    lines = (voc_images / "ood.txt").read_text().splitlines()
    assert lines[0] == f"images/{images[0].name} sed-labels/{images[0].stem}.png" and len(lines) == 14

    # label = argmax of the saved scores; scores = max over each group's concepts of SED's sigmoid, at the image
    from semiseg_cli.models.prompts import templates
    from semiseg_cli.models.semivl import read_class_set
    from semiseg_cli.models.text_embeddings import template_embeddings

    names, groups = read_class_set("sed_voc21")
    assert len(names) == 21 and sum(len(g) for g in groups) == 171
    concepts = [c for g in groups for c in g]
    model = S.SED.from_file(converted["weights"])
    text = template_embeddings(converted["weights"], concepts, templates("imagenet80"))
    img = Image.open(images[3]).convert("RGB")
    with torch.no_grad():
        probs = model(S.sed_input(img, size=64)[None], text).sigmoid()
        probs = F.interpolate(probs, size=(img.height, img.width), mode="bilinear", align_corners=False)[0]
    direct = torch.stack([probs[:151].amax(0)] + [probs[150 + i] for i in range(1, 21)]).numpy()
    scores = np.load(out / "scores" / f"{images[3].stem}.npy")
    label = np.asarray(Image.open(out / f"{images[3].stem}.png"))
    assert scores.shape == (21, img.height, img.width)
    np.testing.assert_allclose(scores, direct, atol=1e-5)
    assert np.array_equal(label, scores.argmax(0))

    # batch 1 gives the scores and labels of batch 4 (every input is resized to one square size); batched
    # convolutions round differently (~1e-7), so a pixel whose two best classes are tied that closely may flip
    out1 = tmp_path / "b1"
    run_cli("gen-pseudo", "--model", "sed", "--weights", converted["weights"], "--classes", "sed_voc21",
            "--images", voc_images / "images", "--out", out1, "--input-size", "64", "--batch-size", "1",
            "--save-scores", check=0)
    for p in images:
        s1, s4 = np.load(out1 / "scores" / f"{p.stem}.npy"), np.load(out / "scores" / f"{p.stem}.npy")
        np.testing.assert_allclose(s1, s4, atol=1e-5)
        top2 = np.sort(s4, 0)[-2:]
        clear = top2[1] - top2[0] > 1e-5
        l1, l4 = np.asarray(Image.open(out1 / f"{p.stem}.png")), np.asarray(Image.open(out / f"{p.stem}.png"))
        assert np.array_equal(l1[clear], l4[clear]) and clear.mean() > 0.99


def test_sed_concept_sets_and_a_mismatched_file(tmp_path):
    from semiseg_cli.errors import UserError
    from semiseg_cli.models.semivl import read_class_set

    names, groups = read_class_set("sed_context60")
    assert len(names) == 60 and names[0] == "background" and sum(len(g) for g in groups) == 163
    assert "coffee table" in groups[0] and "side table" in groups[0]
    voc_names, voc_groups = read_class_set("sed_voc21")
    assert voc_groups[1] == [["aeroplane", "airplane", "glider"]] and voc_names[20] == "tv/monitor"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"class_names": ["background", "cat"], "groups": [["sky"], ["cat"], ["dog"]]}))
    with pytest.raises(UserError, match="3 concept groups for 2 class names"):
        read_class_set(str(bad))


def test_gen_pseudo_sed_bad_options_exit_2(converted, voc_images, tmp_path):
    for args, text in [(["--classes", "sed_voc21"], "needs --weights"),
                       (["--weights", converted["weights"], "--classes", "sed_voc21", "--input-size", "100"],
                        "multiple of 32"),
                       (["--weights", tmp_path / "nope.pt", "--classes", "sed_voc21"], "convert-weights sed"),
                       (["--weights", converted["weights"], "--classes", "sed_voc21", "--precision", "fp8"],
                        "fp8")]:
        proc = run_cli("gen-pseudo", "--model", "sed", "--images", voc_images / "images", "--out", tmp_path / "o", *args)
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_prepare_coco_ood_then_label_it_as_the_trainer_reads_it(converted, shared_data, tmp_path):
    """`prepare-data coco-ood` lists train2017 for gen-pseudo (idempotent); an image carrying an EXIF rotation
    is labelled unrotated, as `load_image` (the trainer's reader) sees it."""
    from semiseg_cli.data.reader import load_image

    src = tmp_path / "coco" / "train2017"
    src.mkdir(parents=True)
    samples = sorted((shared_data / "voc_samples").glob("*_image.png"))[:3]
    for i, p in enumerate(samples):
        img = Image.open(p).convert("RGB")
        exif = Image.Exif()
        if i == 0:
            exif[0x0112] = 6  # Orientation: rotate 90 degrees on display
        img.crop((0, 0, img.width, img.height - 40)).save(src / f"{i:012d}.jpg", exif=exif)
    root = tmp_path / "ood"
    first = json.loads(run_cli("prepare-data", "coco-ood", "--src", tmp_path / "coco", "--root", root, check=0).stdout)
    again = json.loads(run_cli("prepare-data", "coco-ood", "--src", tmp_path / "coco", "--root", root, check=0).stdout)
    assert first["written"] == 4 and again["written"] == 0  # 3 links + the list; nothing the second time
    assert (root / "ood_images.txt").read_text().splitlines() == [f"images/train2017/{i:012d}.jpg" for i in range(3)]
    run_cli("gen-pseudo", "--model", "sed", "--weights", converted["weights"], "--classes", "sed_context60",
            "--images", root / "ood_images.txt", "--out", root / "pseudo" / "sed_context60", "--input-size", "64",
            "--list", root / "splits" / "ood_context" / "labeled.txt", "--root", root, check=0)
    lines = (root / "splits" / "ood_context" / "labeled.txt").read_text().splitlines()
    assert lines[0] == "images/train2017/000000000000.jpg pseudo/sed_context60/000000000000.png"
    label = Image.open(root / "pseudo" / "sed_context60" / "000000000000.png")
    assert label.size == load_image(root / "images" / "train2017" / "000000000000.jpg").size  # not rotated
    assert np.asarray(label).max() < 60
