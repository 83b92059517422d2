"""SimSeg: the released-checkpoint converter, LoDA pooling, the zero-shot rule and its CRF step, eval through the
CLI on the real VOC samples. Models are tiny (a 2-block ViT of width 64, a 2-layer BERT of width 64) and saved in
the released layout by the tests (specs/checked_against_originals.md, SimSeg)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg_cli.models.clip_vit import resize_pos_embed
from semiseg_cli.models.simseg import (CRF, candidates, class_mask, masked_mean,
                                       topk_mean)
from tests.conftest import run_cli

import timm
import transformers  # the `semiseg[simseg]` extra (`.[test]` installs it)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a photo of the an cat dog bad itap my many tattoo in is there this one scene . , ' s background aeroplane "
    "bicycle bird boat bottle bus car chair cow table horse motorbike person plant sheep sofa train monitor "
    "good large small close - up cropped bright dark").split() + ["##s", "##ing"]


def released(tmp_path, grid=14, extra=None, drop=None, meta=None):
    """A SimSeg checkpoint in the released layout: {'state_dict' (DDP `module.` prefixes), 'optimizer', 'meta'
    (with a TorchVersion)}, from randomly initialised timm / transformers modules; returns (path, vit, bert,
    image_proj, text_proj, vocab folder)."""
    from torch.torch_version import TorchVersion

    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=grid * 16, depth=2,
                            embed_dim=64, num_heads=1).eval()
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=1, intermediate_size=128),
                                  add_pooling_layer=False).eval()
    image_proj, text_proj = torch.randn(512, 64) * 0.1, torch.randn(512, 64) * 0.1
    sd = {f"module.image_encoder.model.model.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"module.text_encoder.model.model.{k}": v for k, v in bert.state_dict().items()})
    sd["module.text_encoder.model.model.embeddings.position_ids"] = torch.arange(512)[None]
    sd.update({"module.image_projection.linear.weight": image_proj, "module.text_projection.linear.weight": text_proj,
               "module.loss.temperature": torch.tensor(0.03)})
    sd.update(extra or {})
    for k in drop or ():
        sd.pop(k)
    path = tmp_path / "simseg.vit-tiny.pth"
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                "meta": meta or {"torch_version": TorchVersion("1.10.0"), "epoch": 20}}, path)
    tok = tmp_path / "bert-base-uncased"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return path, vit, bert, image_proj, text_proj, tok


def convert(tmp_path, *extra_args, check=0, **kw):
    path, *rest = released(tmp_path, **kw)
    dst = tmp_path / "simseg-tiny.pt"
    proc = run_cli("convert-weights", "simseg", path, dst, "--tokenizer", rest[-1], *extra_args, check=check)
    return proc, dst, rest


def load(dst):
    from semiseg_cli.engine.checkpoint import model_from_checkpoint

    return model_from_checkpoint(dst)


def test_released_checkpoint_converts_and_embeds_like_the_reference_modules(tmp_path):
    proc, dst, (vit, bert, image_proj, text_proj, _) = convert(tmp_path, "-v")
    assert "embeddings.position_ids -> (dropped: BERT's position ids" in proc.stderr
    assert json.loads(proc.stdout)["keys"] == len(vit.state_dict()) + len(bert.state_dict()) + 4  # + proj x2, tau, vocab
    cfg, model = load(dst)
    model.eval()
    s = cfg["simseg"]
    assert (s["vit_depth"], s["vit_width"], s["vit_heads"], s["text_layers"], s["text_width"], s["text_mlp"],
            s["vocab_size"]) == (2, 64, 1, 2, 64, 128, len(WORDS))
    assert float(model.temperature.detach()) == pytest.approx(0.03) and cfg["model"]["class_text"] == "simseg_voc21"

    # the image side at the 288 eval input: SimSeg's ViT forward with the 14-grid table resized to 18 on load
    x = torch.randn(2, 3, 288, 288)
    with torch.no_grad():
        pe = vit.pos_embed
        tok = pe[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
        pe = torch.cat([pe[:, :1], F.interpolate(tok, size=(18, 18), mode="bicubic", align_corners=False)
                        .permute(0, 2, 3, 1).flatten(1, 2)], 1)
        t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = vit.norm(vit.blocks(torch.cat([vit.cls_token.expand(2, -1, -1), t], 1) + pe))
        patches = t[:, 1:] @ image_proj.T
        top5 = patches.sort(dim=1, descending=True).values[:, :5].mean(1)
        want_g = top5 / (top5.norm(dim=-1, keepdim=True) + 1e-8)
        g, got_patches, grid = model.image_embedding(x)
    assert grid == (18, 18)
    torch.testing.assert_close(got_patches, patches, atol=1e-4, rtol=0)
    torch.testing.assert_close(g, want_g, atol=1e-4, rtol=0)

    # the text side: BERT states -> projection -> max over valid tokens (-10000 on padding) -> L2 (+1e-8)
    texts = ["a photo of the cats.", "a bad photo of a dog.", "itap of my boat"]
    ids, mask = model.tokenizer(texts)
    assert ids.shape == (3, 25)
    assert ids[0, :9].tolist() == [WORDS.index(w) for w in ("[CLS]", "a", "photo", "of", "the", "cat", "##s", ".", "[SEP]")]
    assert mask[0].tolist() == [1] * 9 + [0] * 16 and ids[0, 9:].eq(0).all()
    with torch.no_grad():
        states = bert(input_ids=ids, attention_mask=mask).last_hidden_state @ text_proj.T
        states[mask == 0] = -10000
        mx = states.max(1).values
        want_t = mx / (mx.norm(dim=-1, keepdim=True) + 1e-8)
        got_t = model.encode_text(texts)
    torch.testing.assert_close(got_t, want_t, atol=1e-4, rtol=0)

    # class embeddings: the mean over the 80 ImageNet templates of the unit prompt embeddings, / its norm
    from semiseg_cli.models.prompts import templates

    prompts = [t.format("cat") for t in templates("imagenet80")]
    assert len(prompts) == 80 and prompts[0] == "a bad photo of a cat."
    with torch.no_grad():
        mean = model.encode_text(prompts).mean(0)
    torch.testing.assert_close(model.class_embeddings()[model.class_names.index("cat")], mean / mean.norm(),
                               atol=1e-6, rtol=0)


def test_bad_released_files_exit_2_naming_the_problem(tmp_path):
    proc, _, _ = convert(tmp_path / "a", check=2, extra={"module.image_encoder.model.model.extra.weight": torch.ones(2)})
    assert "unknown target keys (e.g. image_encoder.extra.weight)" in proc.stderr
    proc, _, _ = convert(tmp_path / "a", check=2, extra={"module.decoder.weight": torch.ones(2)})
    assert "unused source keys (e.g. module.decoder.weight)" in proc.stderr
    proc, _, _ = convert(tmp_path / "b", check=2, drop=["module.text_encoder.model.model.encoder.layer.1.output.dense.bias"])
    assert "missing target keys (e.g. text_encoder.encoder.layer.1.output.dense.bias)" in proc.stderr
    proc, _, _ = convert(tmp_path / "c", check=2, extra={"module.text_encoder.model.model.embeddings.position_ids":
                                                        torch.arange(512).flip(0)[None]})
    assert "position ids were changed" in proc.stderr
    # any pickled class other than meta's TorchVersion is refused, nothing executed
    proc, _, _ = convert(tmp_path / "d", check=2, meta={"args": argparse.Namespace(lr=1)})
    assert "refused to load" in proc.stderr and "Traceback" not in proc.stderr
    # the vocabulary must be the one the BERT was trained with, and is required
    path, *_ = released(tmp_path / "e")
    short = tmp_path / "e" / "short.txt"
    short.write_text("\n".join(WORDS[:-1]) + "\n")
    proc = run_cli("convert-weights", "simseg", path, tmp_path / "e" / "o.pt", "--tokenizer", short, check=2)
    assert f"{len(WORDS) - 1} tokens, but the checkpoint's BERT has {len(WORDS)}" in proc.stderr
    proc = run_cli("convert-weights", "simseg", path, tmp_path / "e" / "o.pt", check=2)
    assert "--tokenizer DIR" in proc.stderr
    for p in (tmp_path / "a", tmp_path / "d"):
        assert not (p / "simseg-tiny.pt").exists()
    for proc in (proc,):
        assert len(proc.stderr.strip().splitlines()) == 1


def test_loda_pooling_equals_a_per_channel_loop():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 6)
    got = topk_mean(x, 3)
    for b in range(2):
        for c in range(6):
            want = np.mean(sorted(x[b, :, c].tolist(), reverse=True)[:3])  # per channel: its own 3 tokens
            assert float(got[b, c]) == pytest.approx(float(want), abs=1e-6)
    before = x.clone()
    mask = torch.tensor([[1] * 4 + [0] * 5, [1] * 9])
    masked = topk_mean(x, 5, mask)  # k cut to the shortest valid length (4); padding never selected in row 0
    for c in range(6):
        assert float(masked[0, c]) == pytest.approx(float(np.mean(sorted(x[0, :4, c].tolist(), reverse=True)[:4])), abs=1e-6)
        assert float(masked[1, c]) == pytest.approx(float(np.mean(sorted(x[1, :, c].tolist(), reverse=True)[:4])), abs=1e-6)
    assert torch.equal(x, before)  # the input is not overwritten (the original fills it in place)
    torch.testing.assert_close(masked_mean(x, mask)[0], x[0, :4].mean(0))
    one = topk_mean(x, 1, mask)
    torch.testing.assert_close(one[0], x[0, :4].max(0).values)


def test_position_table_resize_keeps_cls_and_is_identity_on_its_grid():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_pos_embed(pe, (14, 14), (14, 14)) is pe
    out = resize_pos_embed(pe, (14, 14), (18, 18))
    assert out.shape == (1, 1 + 324, 8) and torch.equal(out[:, 0], pe[:, 0])


def test_zero_shot_candidates_on_hand_made_scores():
    s = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2, 0.75, 0.0, 0.05, 0.15, 0.3, 0.12, 0.11])
    # theta = mean + std (ddof 1) of the top 10 = 0.744; the walk over the top 5 = [0 (background: skipped, but
    # it uses a slot), 1 (0.8), 5 (0.75), 3 (0.7 < theta: stop), 9]
    top = np.sort(s.numpy())[::-1][:10]
    theta = top.mean() + top.std(ddof=1)
    assert 0.74 < theta < 0.75
    assert candidates(s, top_m=10) == [1, 5]
    assert candidates(s, top_m=10, sigma=0.5) == [1, 5, 3]
    # background in the walk uses one of the 5 slots: with 5 high classes, only 4 get a mask
    s2 = torch.tensor([0.99, 0.9, 0.89, 0.88, 0.87, 0.86, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert candidates(s2, top_m=10, sigma=0.0) == [1, 2, 3, 4]
    # sigma raises theta; M larger than K is clamped to K (not an error); M = 1 gives theta = the top score
    assert candidates(s2, top_m=10, sigma=100.0) == []
    assert candidates(s, top_m=30) == candidates(s, top_m=12)
    assert candidates(torch.tensor([0.1, 0.5, 0.4]), top_m=1) == [1]
    # stop at the first class below theta even when a later one would pass (descending order: never happens),
    # and skip background when it is the top score
    assert candidates(torch.tensor([0.9, 0.1, 0.0, 0.0]), top_m=4) == []


def test_class_mask_equals_direct_pydensecrf_then_one_closing():
    import cv2
    import pydensecrf.densecrf as dcrf

    from semiseg_cli.data.reader import load_image
    from tests.conftest import SHARED

    img_path = sorted((SHARED / "voc_samples").glob("*_image.png"))[0]
    image = cv2.resize(np.asarray(load_image(img_path)), (288, 288), interpolation=cv2.INTER_LINEAR)
    torch.manual_seed(2)
    cos = torch.rand(1, 18, 18) * 2 - 1
    got = class_mask(cos, torch.from_numpy(image).permute(2, 0, 1), 16)
    # SimSeg's seg_evaluation.py steps, restated with pydensecrf directly
    a = np.kron(cos[0].numpy(), np.ones((16, 16), np.float32))
    p = (a - a.min()) / (a.max() - a.min())
    probs = np.stack([1 - p, p])
    d = dcrf.DenseCRF2D(288, 288, 2)
    d.setUnaryEnergy(np.ascontiguousarray((-np.log(probs + 1e-8)).reshape(2, -1).astype(np.float32)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=40, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    q = np.argmax(np.array(d.inference(3)), axis=0).reshape(288, 288)
    m = (q * 255).astype(np.uint8)
    kernel = np.ones((7, 7), np.uint8)
    want = cv2.erode(cv2.dilate(m, kernel, 5), kernel, 3) > 127  # 5 and 3 land in `dst`, as in the original
    assert CRF["iters"] == 3 and got.shape == (288, 288)
    assert np.array_equal(got.numpy(), want) and 0 < want.sum() < want.size


def test_zero_shot_maps_follow_the_rule_on_a_real_image(tmp_path):
    _, dst, _ = convert(tmp_path)
    cfg, model = load(dst)
    model.eval()
    from semiseg_cli.data.reader import load_image
    from semiseg_cli.data.transforms import normalize
    from tests.conftest import SHARED

    img = np.array(load_image(sorted((SHARED / "voc_samples").glob("*_image.png"))[1]))
    x = normalize(torch.from_numpy(img).permute(2, 0, 1).float()[None])
    with torch.no_grad():
        g, _, _ = model.image_embedding(F.interpolate(x, size=(288, 288), mode="bilinear", antialias=True))
        # class text chosen so that classes 8 and 12 fire and the rest do not (an untrained model fires nothing)
        text = F.normalize(torch.randn(21, 512, generator=torch.Generator().manual_seed(0)), dim=-1) * 0.05
        text[8], text[12], text[0] = g[0], F.normalize(g[0] + 0.3 * text[3], dim=-1), g[0]
        model._class_text = F.normalize(text, dim=-1)
        maps = model.aggregate(x, {}, None)
        scores = g[0] @ model._class_text.T
    assert maps.shape == (1, 21) + img.shape[:2]
    fired = [c for c in range(21) if maps[0, c].abs().sum() > 0]
    assert fired == candidates(scores, 10) == [8, 12]  # background (0) ranks first and is skipped
    for c in fired:
        values = maps[0, c].unique().tolist()
        assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(float(scores[c]), abs=1e-6)
    # each fired map is the CRF + closing mask of its cosine map on the de-normalised uint8 square, resized
    square = F.interpolate(x, size=(288, 288), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb = ((square[0] * std + mean) * 255).clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        _, patches, _ = model.image_embedding(square)
    cos = (F.normalize(patches[0], dim=-1) @ model._class_text.T).T.reshape(21, 1, 18, 18)
    for c in fired:
        want = F.interpolate(class_mask(cos[c], rgb, 16)[None, None].float(), size=img.shape[:2], mode="nearest")[0, 0]
        assert torch.equal(maps[0, c] != 0, want > 0)
    label = maps[0].argmax(0)
    both = (maps[0, 8] > 0) & (maps[0, 12] > 0)
    assert (label[both] == (8 if scores[8] >= scores[12] else 12)).all()  # the higher image score wins overlaps
    assert (label[(maps[0, 8] == 0) & (maps[0, 12] == 0)] == 0).all()


def test_eval_and_infer_zero_shot_on_the_real_voc_samples(tmp_path, shared_data):
    _, dst, _ = convert(tmp_path)
    root = tmp_path / "voc"
    (root / "splits").mkdir(parents=True)
    src = shared_data / "voc_samples"
    stems = sorted(p.name[: -len("_image.png")] for p in src.glob("*_image.png"))
    for s in stems:
        for kind in ("image", "label"):
            (root / f"{s}_{kind}.png").symlink_to(src / f"{s}_{kind}.png")
    (root / "splits" / "val.txt").write_text("".join(f"{s}_image.png {s}_label.png\n" for s in stems))
    proc = run_cli("eval", "--checkpoint", dst, "--set", f"dataset.root={root}", "--set", "train.workers=0", "--json",
                   check=0)
    result = json.loads(proc.stdout)
    assert result["images"] == 14 and result["num_classes"] == 21 and result["class_names"][0] == "background"
    assert 0 <= result["miou"] <= 100
    out = tmp_path / "pred"
    proc = run_cli("infer", "--checkpoint", dst, "--images", root / f"{stems[0]}_image.png", "--out", out, check=0)
    assert json.loads(proc.stdout)["written"] == 1
    # it trains on image-caption pairs only (method simseg): without them, one line saying what to set
    arch = torch.load(dst, weights_only=True)["config"]
    sets = [f"model.backbone={arch['model']['backbone']}"] + [f"simseg.{k}={v}" for k, v in arch["simseg"].items()
                                                             if k.startswith(("vit_", "text_", "vocab_size")) and v is not None]
    bad = run_cli("train", "--recipe", "simseg-vit-s-voc", "--set", f"model.init_checkpoint={dst}", "--set",
                  f"dataset.root={root}", *[a for x in sets for a in ("--set", x)], "--out", tmp_path / "run", check=2)
    assert "image-caption pairs: set captions.path" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_retrieval_metrics_equal_torchmetrics_hit_rate():
    from torchmetrics.retrieval import RetrievalHitRate

    from semiseg_cli.engine.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(3)
    image_ids = torch.tensor([4, 9, 2, 7, 5, 11])
    text_ids = image_ids.repeat_interleave(3)[torch.randperm(18, generator=g)]  # 3 captions per image, shuffled
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    owner = torch.tensor([int((image_ids == t).nonzero()) for t in text_ids])
    txt = F.normalize(torch.randn(18, 16, generator=g) + 1.5 * img[owner], dim=-1)  # noisy copies of their image
    got = retrieval_metrics(img, image_ids, txt, text_ids)
    sim = img @ txt.T
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(sim.flatten(), (image_ids[:, None] == text_ids[None]).flatten(),
                                        indexes=torch.arange(6).repeat_interleave(18))
        t2i = RetrievalHitRate(top_k=k)(sim.T.flatten(), (text_ids[:, None] == image_ids[None]).flatten(),
                                        indexes=torch.arange(18).repeat_interleave(6))
        assert got[f"i2t_r{k}"] == pytest.approx(float(i2t) * 100, abs=1e-4)
        assert got[f"t2i_r{k}"] == pytest.approx(float(t2i) * 100, abs=1e-4)
    assert got["rsum"] == pytest.approx(sum(got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)), abs=1e-3)
    assert 0 < got["i2t_r1"] < 100 and got["t2i_r10"] == 100.0  # 6 images: every caption's image is in the top 10


def test_eval_retrieval_on_a_parquet_of_real_images(tmp_path, shared_data):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from semiseg_cli.engine.retrieval import image_tensor

    _, dst, _ = convert(tmp_path)
    rows = []
    for i, p in enumerate(sorted((shared_data / "voc_samples").glob("*_image.png"))[:4]):
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, format="JPEG")
        for j, cap in enumerate(("a photo of a cat.", "a dog in the scene")):
            rows.append({"imbytes": buf.getvalue(), "caption": cap, "image_id": i, "id": 10 * i + j})
    rows.append({"imbytes": b"", "caption": "dropped", "image_id": -1, "id": 99})  # image_id <= -1: dropped
    path = tmp_path / "valid.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    proc = run_cli("eval", "--checkpoint", dst, "--retrieval", path, "--json", check=0)
    out = json.loads(proc.stdout)
    assert (out["images"], out["captions"]) == (4, 8)
    assert all(0 <= out[f"{d}_r{k}"] <= 100 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert out["i2t_r10"] == 100.0 and out["t2i_r5"] == 100.0  # 8 captions, 4 images
    # the eval transform: square 324, centre crop 288
    blob = rows[0]["imbytes"]
    x = image_tensor(blob, 324, 288, "x")
    im = Image.open(io.BytesIO(blob)).convert("RGB").resize((324, 324), Image.BILINEAR).crop((18, 18, 306, 306))
    assert torch.equal(x, torch.from_numpy(np.array(im)).permute(2, 0, 1).float())
    # bad files: one line, exit 2
    pq.write_table(pa.Table.from_pylist([{"caption": "x", "image_id": 0}]), tmp_path / "bad.parquet")
    bad = run_cli("eval", "--checkpoint", dst, "--retrieval", tmp_path / "bad.parquet", check=2)
    assert "no column imbytes, id" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("eval", "--checkpoint", dst, "--retrieval", tmp_path / "missing.parquet", check=2)
    assert "retrieval file not found" in bad.stderr


def test_prepare_coco_object_remaps_stuffthingmaps_and_eval_runs(tmp_path, shared_data):
    from PIL import Image

    from semiseg_cli.data.prepare import COCO_THING_IDS

    src = tmp_path / "coco_stuff164k"
    (src / "images" / "val2017").mkdir(parents=True)
    (src / "annotations" / "val2017").mkdir(parents=True)
    sample = sorted((shared_data / "voc_samples").glob("*_image.png"))[0]
    img = Image.open(sample).convert("RGB")
    w, h = img.size
    raw = np.full((h, w), 255, np.uint8)            # unlabeled -> background
    raw[: h // 4] = 0                                # person (COCO id 1) -> 1
    raw[h // 4: h // 2] = 89                         # toothbrush (id 90) -> 80
    raw[h // 2: 3 * h // 4] = 12                     # stop sign (id 13, after the gap at 12) -> 12
    raw[3 * h // 4:, : w // 2] = 100                 # a stuff class -> background
    for stem in ("000000000139", "000000000285"):
        img.save(src / "images" / "val2017" / f"{stem}.jpg")
        Image.fromarray(raw).save(src / "annotations" / "val2017" / f"{stem}.png")
    Image.fromarray(raw).save(src / "annotations" / "val2017" / "000000000139_labelTrainIds.png")  # mmseg's: unread
    root = tmp_path / "coco_object"
    out = json.loads(run_cli("prepare-data", "coco_object", "--src", src, "--root", root, check=0).stdout)
    assert out["files_missing"] == 0 and out["written"] == 5  # 2 images, 2 masks, the val list
    mask = np.array(Image.open(root / "masks" / "val2017" / "000000000139.png"))
    assert len(COCO_THING_IDS) == 80
    assert mask[0, 0] == 1 and mask[h // 4, 0] == 80 and mask[h // 2, 0] == COCO_THING_IDS.index(13) + 1 == 12
    assert mask[-1, 0] == 0 and mask[-1, -1] == 0
    assert (root / "splits" / "val.txt").read_text().splitlines() == [
        "images/val2017/000000000139.jpg masks/val2017/000000000139.png",
        "images/val2017/000000000285.jpg masks/val2017/000000000285.png"]
    again = json.loads(run_cli("prepare-data", "coco_object", "--src", src, "--root", root, check=0).stdout)
    assert again["written"] == 0  # idempotent
    _, dst, _ = convert(tmp_path, "--recipe", "simseg-vit-s-coco-object")
    result = json.loads(run_cli("eval", "--checkpoint", dst, "--set", f"dataset.root={root}", "--json", check=0).stdout)
    assert result["images"] == 2 and result["num_classes"] == 81 and result["class_names"][80] == "toothbrush"


def tiny_model(dropout: float = 0.0):
    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    cfg = load_config("simseg-vit-s-voc", ["simseg.vit_depth=1", "simseg.vit_width=32", "simseg.vit_heads=1",
                                           "simseg.text_layers=1", "simseg.text_width=32", "simseg.text_heads=1",
                                           "simseg.text_mlp=64", "simseg.image_size=48", "simseg.embed_dim=16",
                                           f"simseg.vocab_size={len(WORDS)}"])
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False)
    for m in model.text_encoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model.train()


def test_nce_loss_equals_open_clips_clip_loss():
    import open_clip

    from semiseg_cli.methods.simseg_loss import nce_loss

    g = torch.Generator().manual_seed(4)
    img, txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1), F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    for tau in (0.02, 0.0001, 0.9):  # inside, below and above the clamp [1e-3, 0.5]
        got, logs = nce_loss(img, txt, torch.tensor(tau))
        want = open_clip.ClipLoss(local_loss=True, gather_with_grad=True)(img, txt, 1.0 / min(max(tau, 1e-3), 0.5))
        assert float(got) == pytest.approx(float(want), rel=1e-6)  # float32 at logit scale 1000
    assert 0 <= float(logs["i2t_acc"]) <= 1


def test_gradient_cache_gives_the_full_batch_gradients_tau_included():
    from semiseg_cli.methods.simseg_loss import cached_backward, nce_loss

    model = tiny_model()
    torch.manual_seed(5)
    x = torch.randn(7, 3, 48, 48)
    ids = torch.randint(5, len(WORDS), (7, 6))
    mask = torch.ones(7, 6, dtype=torch.long)
    mask[:, 4:] = 0
    f, t = model(x, text=(ids, mask))
    loss, _ = nce_loss(f, t, model.temperature)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cached, _ = cached_backward(model, x, ids, mask, model.temperature, chunk=3)
    assert float(cached) == pytest.approx(float(loss.detach()), abs=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and "temperature" in got and float(want["temperature"].abs()) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_gradient_cache_re_forwards_with_the_same_dropout():
    from semiseg_cli.methods.simseg_loss import cached_backward

    model = tiny_model(dropout=0.5)
    seen = []
    forward = model.forward

    def spy(*a, **k):
        out = forward(*a, **k)
        seen.append(out[1].detach().clone())
        return out

    model.forward = spy
    x, ids = torch.randn(4, 3, 48, 48), torch.randint(5, len(WORDS), (4, 6))
    cached_backward(model, x, ids, torch.ones(4, 6, dtype=torch.long), model.temperature, chunk=2)
    assert len(seen) == 4  # two cached chunks, then the same two re-forwarded
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3]) and not torch.equal(seen[0], seen[1])


def _two_process_worker(rank: int, store: str, out: str, data: dict) -> None:
    import torch.distributed as dist
    from types import SimpleNamespace

    from semiseg_cli.methods.simseg_loss import cached_backward

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = tiny_model()
    half = slice(4 * rank, 4 * rank + 4)
    cached_backward(model, data["x"][half], data["ids"][half], data["mask"][half], model.temperature, chunk=3,
                    env=SimpleNamespace(rank=rank, world=2))
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # what DDP does: the mean over processes
            grads[n] = p.grad / 2
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_two_gloo_processes_give_the_step_of_one_process_on_the_doubled_batch(tmp_path):
    import torch.multiprocessing as mp

    from semiseg_cli.methods.simseg_loss import cached_backward

    torch.manual_seed(6)
    data = {"x": torch.randn(8, 3, 48, 48), "ids": torch.randint(5, len(WORDS), (8, 6)),
            "mask": torch.ones(8, 6, dtype=torch.long)}
    mp.spawn(_two_process_worker, args=(str(tmp_path / "store"), str(tmp_path / "g.pt"), data), nprocs=2)
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    model = tiny_model()
    cached_backward(model, data["x"], data["ids"], data["mask"], model.temperature, chunk=5)
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
