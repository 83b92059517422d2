"""SimSeg's text-supervised training (method simseg): caption augmentation, the three pair layouts, the sample's own
augmentation RNG, and `semiseg train` end to end (the gradient cache changes nothing, a killed run resumes exactly,
two processes read their own tar shards)."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.data.captions import caption, vocabulary
from semiseg_cli.data.splits import read_split, write_split
from semiseg_cli.data.text import Tokenizer, augment_caption
from tests.conftest import run_cli

pytest.importorskip("transformers", reason="the simseg extra (pip install 'semiseg[simseg]') is part of the test extra")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "disc", "##s", "and", "ring", "two"]


def test_caption_augmentation_masks_replaces_and_deletes_at_simsegs_rates():
    tok = Tokenizer("\n".join(WORDS).encode(), 25)
    assert tok.pieces("a photo of two discs") == ["a", "photo", "of", "two", "disc", "##s"]
    assert augment_caption("a photo of two discs", tok, random.Random(0), p=0) == "a photo of two discs"
    # the pieces of a word stay one word when nothing touches them; a masked word loses its ## pieces
    text = "photo " * 5000
    out = augment_caption(text, tok, random.Random(1), p=0.2).split()
    n = 5000
    masked, kept = out.count("[MASK]") / n, out.count("photo") / n
    replaced = (len(out) - out.count("[MASK]") - out.count("photo")) / n   # random tokens other than "photo"
    deleted = 1 - len(out) / n
    assert abs(masked - 0.10) < 0.015 and abs(deleted - 0.08) < 0.015 and replaced < 0.03 and kept > 0.77
    words = augment_caption("two discs and a ring", tok, random.Random(3), p=0.2).split()
    assert all(not w.startswith("##") for w in words)
    ids, mask = tok([" ".join(words)])
    assert ids.shape == mask.shape == (1, 25) and ids[0, 0] == tok.vocab["[CLS]"]


def test_autoaugment_is_drawn_from_the_samples_rng():
    from semiseg_cli.data.transforms import autoaugment

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    a = [np.asarray(autoaugment(img, random.Random(s))) for s in range(12)]
    b = [np.asarray(autoaugment(img, random.Random(s))) for s in range(12)]
    torch.manual_seed(123)  # torch's global generator plays no part
    c = [np.asarray(autoaugment(img, random.Random(s))) for s in range(12)]
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))
    assert sum(not np.array_equal(x, np.asarray(img)) for x in a) >= 6  # most draws change the image


def caption_root(synthetic_root, tmp_path, n: int = 16, val: int = 4):
    """A data root with n training images' captions in the three layouts (CSV, parquet, 2 tar shards), val
    images for the zero-shot evaluation and the vocabulary; the session's synthetic root is only linked."""
    from semiseg_cli.models.prompts import templates

    root = tmp_path / "data"
    root.mkdir()
    for sub in ("images", "masks"):
        (root / sub).symlink_to(synthetic_root / sub)
    (root / "classes.txt").write_text((synthetic_root / "classes.txt").read_text())
    train = read_split(synthetic_root / "splits" / "default" / "unlabeled.txt")[:n]
    write_split(root / "splits" / "val.txt", read_split(synthetic_root / "splits" / "val.txt")[:val])
    rows = [{"image": img, "caption": caption(np.array(Image.open(root / msk)), np.random.default_rng(i))}
            for i, (img, msk) in enumerate(train)]
    with open(root / "pairs.tsv", "w", newline="") as f:  # configurable columns, tab-separated
        w = csv.DictWriter(f, fieldnames=["file", "text"], delimiter="\t")
        w.writeheader()
        w.writerows({"file": r["image"], "text": r["caption"]} for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"imbytes": (root / r["image"]).read_bytes(), "caption": r["caption"]}
                                         for r in rows]), root / "pairs.parquet")
    (root / "shards").mkdir()
    for k in range(2):  # shard 0: 10 pairs, shard 1: 6 (the smaller share sets the epoch under 2 processes)
        with tarfile.open(root / "shards" / f"s{k}.tar", "w") as tar:
            for r in (rows[:10], rows[10:])[k]:
                stem = r["image"].split("/")[-1].split(".")[0]
                for name, data in ((f"{stem}.png", (root / r["image"]).read_bytes()), (f"{stem}.txt", r["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    prompts = [t.format("{}") for t in templates("imagenet80")]
    (root / "vocab.txt").write_text("\n".join(vocabulary([r["caption"] for r in rows], prompts)) + "\n")
    return root, rows


TINY_SIMSEG = ["model.backbone=vit_small_patch8_224", "model.weights=null", "simseg.vit_depth=1", "simseg.vit_width=32", "simseg.vit_heads=2",
               "simseg.vit_patch=8", "simseg.text_layers=1", "simseg.text_width=32", "simseg.text_heads=2",
               "simseg.text_mlp=64", "simseg.image_size=32", "simseg.crf=false", "train.crop_size=32",
               "train.workers=0", "train.log_every=1", "train.global_batch=8", "captions.image_column=file", "captions.caption_column=text"]


def simseg_args(root, *extra):
    sets = [f"dataset.root={root}", f"simseg.vocab={root / 'vocab.txt'}", f"captions.path={root / 'pairs.tsv'}",
            "captions.images=.", *TINY_SIMSEG, *extra]
    return ["--recipe", "simseg-synthetic", *[a for s in sets for a in ("--set", s)]]


def test_the_three_pair_layouts_read_the_same_pairs(synthetic_root, tmp_path):
    from semiseg_cli.config import load_config
    from semiseg_cli.data.dataset import build_stream
    from semiseg_cli.data.pairs import TarPairs, build_pairs

    root, rows = caption_root(synthetic_root, tmp_path)
    base = [f"dataset.root={root}", "method=simseg", "model.name=simseg"]
    tsv = [f"captions.path={root / 'pairs.tsv'}", "captions.image_column=file", "captions.caption_column=text"]
    sources = {path: build_pairs(load_config(None, [*base, *sets]))
               for path, sets in (("tsv", tsv), ("parquet", [f"captions.path={root / 'pairs.parquet'}"]),
                                  ("tar", [f"captions.path={root / 'shards'}"]))}
    for i in (0, 9, 15):
        got = [s.get(i) for s in sources.values()]
        assert all(c == rows[i]["caption"] for _, c in got)
        assert all(np.array_equal(np.asarray(got[0][0]), np.asarray(im)) for im, _ in got)
    # two processes: shard 0 to rank 0, shard 1 to rank 1, the epoch is twice the smaller share
    shares = [TarPairs(root / "shards", "caption", rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [10, 6] and shares[0].epoch_share == 6
    assert [c for s in shares for c in (s.get(i)[1] for i in range(len(s)))] == [r["caption"] for r in rows]
    # the stream's samples: a crop of train.crop_size, token ids and mask of simseg.max_length, same key same sample
    cfg = load_config(None, [*base, *tsv, f"simseg.vocab={root / 'vocab.txt'}", "train.crop_size=48"])
    ds = build_stream(cfg, "captions")
    x, ids, mask = ds[(0, 3, 5)]
    assert x.dtype == torch.uint8 and x.shape == (3, 48, 48) and ids.shape == mask.shape == (25,)
    assert all(torch.equal(a, b) for a, b in zip(ds[(0, 3, 5)], ds[(0, 3, 5)]))
    assert not torch.equal(ds[(1, 3, 5)][0], x)  # another epoch, another crop
    # bad input: one line naming the file and what to do
    bad = run_cli("train", *simseg_args(root, f"captions.path={root / 'missing.csv'}"), "--out", tmp_path / "bad", check=2)
    assert "missing.csv: caption file not found" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("train", *simseg_args(root, "captions.caption_column=caption"), "--out", tmp_path / "bad", check=2)
    assert "no column caption" in bad.stderr and "captions.caption_column" in bad.stderr


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_train_with_the_gradient_cache_equals_one_backward_and_resumes_exactly(synthetic_root, tmp_path):
    root, _ = caption_root(synthetic_root, tmp_path)
    # without dropout (the chunks draw their masks per chunk) and with SGD (Adam's first steps are sign-like, so
    # float rounding of near-zero gradients would show) the chunked step gives the whole batch's update
    exact = ("train.iters=2", "train.eval_every=2", "simseg.text_dropout=0", "optim.name=sgd", "optim.lr=0.05")
    run_cli("train", *simseg_args(root, *exact), "--out", tmp_path / "one", check=0)
    run_cli("train", *simseg_args(root, *exact, "captions.chunk=3"), "--out", tmp_path / "chunks", check=0)
    a, b = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "chunks" / "last.pt")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5) for k in a), \
        "the chunked step must give the full batch's update"
    assert not torch.equal(a["temperature"], torch.tensor(0.02))  # tau is trained
    common = ("train.iters=4", "train.eval_every=2")
    run_cli("train", *simseg_args(root, *common), "--out", tmp_path / "whole", check=0)
    a = _weights(tmp_path / "whole" / "last.pt")
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert {"loss_nce", "i2t_acc", "t2i_acc", "tau"} <= set(log[0]) and any("miou" in r for r in log)
    # a run killed after a checkpoint resumes to the same weights
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "semiseg_cli", "train", *simseg_args(root, *common), "--out", str(part)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (part / "last.pt").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(part / "last.pt", weights_only=True)["iteration"] < 4, "the run finished before it was killed"
    run_cli("train", "--out", part, "--resume", check=0)
    c = _weights(part / "last.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the trained checkpoint is a zero-shot segmenter: eval --run
    out = json.loads(run_cli("eval", "--run", tmp_path / "whole", "--json", check=0).stdout)
    assert 0 <= out["miou"] <= 100


def test_two_processes_read_their_own_tar_shards(synthetic_root, tmp_path):
    root, _ = caption_root(synthetic_root, tmp_path)
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semiseg_cli",
           "train", *simseg_args(root, f"captions.path={root / 'shards'}", "train.epochs=2", "train.eval_every=2",
                                 "train.global_batch=4")]
    proc = subprocess.run(cmd + ["--out", str(run)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each process's epoch: the smaller share (6 pairs) in batches of 2 -> 3 iterations per epoch
    cfg = (run / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "iters_per_epoch: 3" in cfg and "total_iters: 6" in cfg
    w = _weights(run / "last.pt")
    assert not torch.equal(w["temperature"], torch.tensor(0.02)) and all(torch.isfinite(v).all() for v in w.values()
                                                                         if v.is_floating_point())


def test_init_converters_give_the_towers_of_the_original_files(tmp_path):
    """A timm ViT with its 21k head (torch file and safetensors) and a BertForPreTraining state dict (old LayerNorm
    gamma / beta names, position_ids), converted and loaded as model.weights / simseg.text_weights: the towers
    compute what the original modules compute."""
    import timm
    import transformers
    from safetensors.torch import save_file

    from semiseg_cli.config import load_config
    from semiseg_cli.models import build_model

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=7, img_size=64, embed_dim=64,
                            depth=2, num_heads=1).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    bert_cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                       intermediate_size=96, max_position_embeddings=512)
    pre = transformers.BertForPreTraining(bert_cfg).eval()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in pre.state_dict().items()}
    sd["bert.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    for src, dst in (("vit.pth", "vit.pt"), ("vit.safetensors", "vit2.pt")):
        proc = run_cli("convert-weights", "timm-vit", tmp_path / src, tmp_path / dst, check=0)
        assert "dropped" in proc.stderr
    run_cli("convert-weights", "bert", tmp_path / "pytorch_model.bin", tmp_path / "bert.pt", check=0)
    assert torch.load(tmp_path / "vit.pt").keys() == torch.load(tmp_path / "vit2.pt").keys()
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    sets = ["method=simseg", "model.name=simseg", "model.backbone=vit_small_patch16_224", "simseg.vit_depth=2",
            "simseg.vit_width=64", "simseg.vit_heads=1", "simseg.text_layers=1", "simseg.text_width=64",
            "simseg.text_heads=1", "simseg.text_mlp=96", f"simseg.vocab={tmp_path / 'vocab.txt'}", "simseg.vocab_size=null",
            f"model.weights={tmp_path / 'vit.pt'}", f"simseg.text_weights={tmp_path / 'bert.pt'}"]
    x = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        for size in (64, 96):  # the table's own grid, and a larger one (resized on loading, then back on the fly)
            model = build_model(load_config(None, [*sets, f"simseg.image_size={size}"])).eval()
            tokens, _ = model.image_tokens(x)
            if size == 64:
                assert torch.allclose(tokens, vit.forward_features(x), atol=1e-5)
            assert tokens.shape == (2, 17, 64)
        text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(text, pre.bert(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5)
    # a file of other sizes: one line naming it and the fix
    bad = run_cli("train", *simseg_args(tmp_path, f"model.weights={tmp_path / 'vit.pt'}"), "--out", tmp_path / "r",
                  check=2)
    assert "does not fit this config's image tower" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_cnn_tower_gives_one_token_per_stage_position(tmp_path):
    from semiseg_cli.config import load_config
    from semiseg_cli.errors import UserError
    from semiseg_cli.models import build_model

    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    sets = ["method=simseg", "model.name=simseg", "model.backbone=resnet18", "simseg.cnn_stage=3", "simseg.text_layers=1",
            "simseg.text_width=32", "simseg.text_heads=1", "simseg.text_mlp=64", f"simseg.vocab={tmp_path / 'vocab.txt'}",
            "simseg.vocab_size=null", "simseg.image_size=64", "simseg.crf=false"]
    model = build_model(load_config(None, sets))
    assert model.cnn and model.patch == 16
    tokens, grid = model.image_tokens(torch.randn(2, 3, 64, 96))
    assert grid == (4, 6) and tokens.shape == (2, 1 + 24, 256)
    ids = torch.tensor([[2, 5, 6, 3, 0]] * 2)
    f, g = model.train()(torch.randn(2, 3, 64, 64), text=(ids, (ids > 0).long()))
    assert f.shape == g.shape == (2, 512) and torch.allclose(f.norm(dim=1), torch.ones(2), atol=1e-4)
    assert model.eval()(torch.randn(1, 3, 40, 56)).shape == (1, 6, 40, 56)
    with pytest.raises(UserError, match="pool=cls takes a ViT's CLS token"):
        build_model(load_config(None, [*sets, "simseg.pool=cls"]))
