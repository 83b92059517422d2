"""Training streams as data (data/streams.py): the table, the visiting rules, and a new stream added by one
entry: a list three times the epoch is fully visited in three epochs, and a resumed run reads the same keys."""
from __future__ import annotations

import torch

from semiseg_cli.config import load_config
from semiseg_cli.data import streams
from semiseg_cli.data.dataset import SAMPLES, build_stream
from semiseg_cli.data.splits import read_split, write_split
from semiseg_cli.data.streams import SAMPLE_KINDS, STREAMS, Stream, epoch_stream, fake_batch, key_kinds, stream_index
from semiseg_cli.distributed import DistEnv
from semiseg_cli.engine.trainer import RunSampler
from semiseg_cli.methods import METHODS
from semiseg_cli.engine.trainer import load_method


def test_every_stream_names_a_sample_function_and_one_key_per_tensor():
    assert set(SAMPLE_KINDS) == set(SAMPLES) | {"train_caption"}  # the pairs' own dataset (data/pairs.py) makes those
    for name, s in STREAMS.items():
        assert len(s.keys) == len(SAMPLE_KINDS[s.sample]), name
    all_keys = [k for s in STREAMS.values() for k in s.keys]
    assert len(all_keys) == len(set(all_keys))  # one name, one tensor


def test_every_method_reads_known_streams_and_one_defines_the_epoch():
    for method in METHODS:
        loaders = load_method(method).LOADERS
        assert set(loaders) <= set(STREAMS), method
        assert epoch_stream(loaders) in loaders
    assert epoch_stream(("labeled",)) == "labeled"
    assert epoch_stream(("labeled", "unlabeled", "unlabeled_mix")) == "unlabeled"


def test_streams_yield_their_tensors_in_the_table_order(tiny_root):
    # the OOD stream reads its own list under its own root (here the tiny labeled list, masks as its labels)
    cfg = load_config(None, [f"dataset.root={tiny_root}", "dataset.split=tiny", "train.crop_size=48",
                             f"dataset.ood_list={tiny_root / 'splits' / 'tiny' / 'labeled.txt'}",
                             f"dataset.ood_root={tiny_root}"])
    for name, s in STREAMS.items():
        if s.list == "captions":  # image-caption pairs: tests/test_simseg_train.py
            continue
        sample = build_stream(cfg, name)[(0, 3)]
        for key, kind, t in zip(s.keys, SAMPLE_KINDS[s.sample], sample):
            if kind == "image":
                assert t.dtype == torch.uint8 and t.shape == (3, 48, 48), key
            elif kind in ("label", "ignore"):
                assert t.dtype == torch.int64 and t.shape == (48, 48), key
            elif kind == "box":
                assert t.shape == (48, 48) and set(t.unique().tolist()) <= {0.0, 1.0}, key
    # the mix stream: the same image as the unlabeled stream, augmented on its own (seed offset 1)
    u, u_mix = build_stream(cfg, "unlabeled"), build_stream(cfg, "unlabeled_mix")
    assert u_mix.seed == u.seed + 1 and u.items == u_mix.items


def test_a_shorter_stream_is_tiled_and_a_longer_one_visited_by_its_own_permutations():
    assert [stream_index(0, p, 6, 4, 0) for p in range(6)] == [0, 1, 2, 3, 0, 1]
    seen = [stream_index(e, p, 5, 15, 3) for e in range(3) for p in range(5)]
    assert sorted(seen) == list(range(15))                      # 3 epochs of 5 visit all 15 once
    later = [stream_index(e, p, 5, 15, 3) for e in range(3, 6) for p in range(5)]
    assert sorted(later) == list(range(15)) and later != seen   # the next pass is another permutation
    assert stream_index(4, 2, 5, 15, 3) == stream_index(4, 2, 5, 15, 3)


def test_a_new_stream_is_one_table_entry_and_three_epochs_visit_a_list_three_times_longer(tiny_root, tmp_path,
                                                                                           monkeypatch):
    """An OOD-style stream: its own list, unlabeled samples, its own seed; N_ood = 3 N_epoch."""
    root = tmp_path / "data"
    root.mkdir()
    for sub in ("images", "masks"):
        (root / sub).symlink_to(tiny_root / sub)
    (root / "classes.txt").write_text((tiny_root / "classes.txt").read_text())
    items = read_split(tiny_root / "splits" / "tiny" / "unlabeled.txt")
    write_split(root / "splits" / "ood" / "labeled.txt", items[:4])
    write_split(root / "splits" / "ood" / "unlabeled.txt", items[4:16])
    write_split(root / "splits" / "val.txt", items[:2])
    monkeypatch.setitem(STREAMS, "short", Stream("labeled", "train_l", ("x", "y"), defines_epoch=True))
    monkeypatch.setitem(STREAMS, "ood", Stream("unlabeled", "train_u", ("o_w", "o_s1", "o_s2", "o_ign", "o_box1",
                                                                        "o_box2"), seed_offset=7))
    cfg = load_config(None, [f"dataset.root={root}", "dataset.split=ood", "train.crop_size=32"])
    names = ("short", "ood")
    epoch_len = len(build_stream(cfg, epoch_stream(names)))
    ood = build_stream(cfg, "ood")
    assert (epoch_len, len(ood)) == (4, 12) and ood.seed == cfg["train"]["seed"] + 7
    batch, ipe = 2, 2

    def keys(start, total):
        return list(RunSampler(epoch_len, 0, DistEnv(), batch, ipe, start, total, items=len(ood), stream_seed=ood.seed))

    run = keys(0, 3 * ipe)
    assert sorted(k[2] for k in run) == list(range(12))          # every OOD image once in three epochs
    assert keys(3, 3 * ipe) == run[3 * batch:]                    # resume at iteration 3: the same keys
    assert torch.equal(ood[run[7]][0], ood[keys(3, 3 * ipe)[1]][0])  # ... and the same augmented views
    assert set(key_kinds(names)) == {"x", "y", "o_w", "o_s1", "o_s2", "o_ign", "o_box1", "o_box2"}
    assert set(fake_batch(names)) == set(key_kinds(names))


def test_fake_batch_has_every_key_of_the_streams_with_its_kind():
    batch = fake_batch(("labeled", "unlabeled"), n=3, size=16, num_classes=4)
    assert batch["x"].shape == (3, 3, 16, 16) and int(batch["y"].max()) < 4
    assert (batch["ign"][:, -4:] == 255).all() and (batch["ign"][:, :-4] == 0).all()
    assert set(batch) == set(streams.key_kinds(("labeled", "unlabeled")))
