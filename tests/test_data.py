import random

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.data import transforms as T
from semiseg_cli.data.dataset import SegDataset
from semiseg_cli.data.reader import load_mask
from semiseg_cli.data.splits import read_split, split_path
from semiseg_cli.errors import UserError
from tests.conftest import REPO

# classes present in each VOC sample, from shared/data/README.md (besides background 0 and border 255)
VOC_SAMPLE_CLASSES = {474: {6}, 120: {2, 5}, 293: {10}, 582: {14, 15}, 8: {13}}


def test_voc_samples_are_read_as_index_masks(shared_data):
    root = shared_data / "voc_samples"
    items = [(f"{n}_image.png", f"{n}_label.png") for n in VOC_SAMPLE_CLASSES]
    ds = SegDataset(root, items, "val", num_classes=21)
    for i, n in enumerate(VOC_SAMPLE_CLASSES):
        x, y, idx = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 513, 513) and idx == i
        present = set(torch.unique(y).tolist())
        assert present - {0, 255} == VOC_SAMPLE_CLASSES[n]
        # the index PNG agrees with the shipped colour target through the VOC palette
        target = np.array(Image.open(root / f"{n}_target.png").convert("RGB"))
        from semiseg_cli.data.facts import palette
        assert np.array_equal(palette("voc")[y.numpy()], target)


def test_cityscapes_frame_train_ids(shared_data):
    root = shared_data / "cityscapes_sample"
    img = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    mask = "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    x, y, _ = SegDataset(root, [(img, mask)], "val", num_classes=19)[0]
    assert x.shape == (3, 128, 256)
    assert set(torch.unique(y).tolist()) == {0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 255}
    # labelIds are not train ids: values up to 26 must be rejected for a 19-class dataset
    with pytest.raises(UserError, match="outside 0..18"):
        load_mask(root / mask.replace("labelTrainIds", "labelIds"), (256, 128), 19)


def test_unlabeled_sample_geometry_and_padding(shared_data):
    root = shared_data / "voc_samples"
    ds = SegDataset(root, [("474_image.png", None)], "train_u", num_classes=21, crop_size=600, seed=3)
    u_w, u_s1, u_s2, ign, box1, box2 = ds[(0, 0)]
    assert u_w.shape == u_s1.shape == u_s2.shape == (3, 600, 600) and u_w.dtype == torch.uint8
    assert ign.shape == box1.shape == (600, 600)
    # padding is black in the image and exactly the ignore region (crop 600 > some rescales of 513)
    padded = ign == 255
    assert torch.all(u_w[:, padded] == 0)
    assert set(torch.unique(box1).tolist()) <= {0.0, 1.0}


def test_augmentation_is_a_function_of_seed_epoch_index(shared_data):
    root = shared_data / "voc_samples"
    items = [(f"{n}_image.png", f"{n}_label.png") for n in VOC_SAMPLE_CLASSES]
    ds = SegDataset(root, items, "train_u", num_classes=21, crop_size=128, seed=1)
    a, b, c = ds[(0, 2)], ds[(0, 2)], ds[(1, 2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # identical batches with 0 and 2 workers
    keys = [(0, i) for i in range(len(items))]
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=keys, num_workers=workers)
        batches.append([t for batch in loader for t in batch])
    assert all(torch.equal(p, q) for p, q in zip(*batches))


def test_labeled_crop_pads_mask_with_255(shared_data):
    root = shared_data / "voc_samples"
    ds = SegDataset(root, [("1_image.png", "1_label.png")], "train_l", num_classes=21, crop_size=1100)
    x, y = ds[0]
    assert x.shape == (3, 1100, 1100) and y.shape == (1100, 1100)
    assert (y == 255).sum() > 1100 * 1100 - 1026 * 1026  # the long side is at most 2 x 513 = 1026


def test_resize_rules():
    img, mask = Image.new("RGB", (500, 375)), Image.new("L", (500, 375))
    for s in range(20):
        rng = random.Random(s)
        i, m = T.resize_long(img, mask, rng)
        assert 250 <= max(i.size) <= 1000 and i.size == m.size
        assert abs(i.size[1] / i.size[0] - 0.75) < 0.01
        i, m = T.resize_short(img, mask, random.Random(s))
        assert 256 <= min(i.size) <= 1024 and i.size == m.size
    assert T.resize_short_exact(img, 512).size == (683, 512)


def test_cutmix_box_area_and_shape():
    boxes = [T.cutmix_box(64, random.Random(s)) for s in range(200)]
    empty = sum(int(b.sum() == 0) for b in boxes)
    assert 60 < empty < 140  # p = 0.5
    for b in boxes:
        if b.sum():
            ys, xs = torch.nonzero(b, as_tuple=True)
            h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            assert b.sum() == h * w  # one solid rectangle
            assert b.sum() <= 0.4 * 64 * 64 + 1


def test_normalize_matches_torchvision():
    import torchvision.transforms.functional as TF
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, T.MEAN, T.STD)
    assert torch.allclose(T.normalize(x), ref, atol=1e-5)


def test_bad_files_are_user_errors(tmp_path, shared_data):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "img.png")
    Image.fromarray(np.full((20, 20), 40, np.uint8)).save(tmp_path / "big.png")
    cases = [(("bad.png", "small.png"), "cannot decode image"), (("img.png", "small.png"), "mask is 10x10"),
             (("img.png", "big.png"), r"label values \[40\]"), (("missing.png", "small.png"), "image not found")]
    for item, words in cases:
        with pytest.raises(UserError, match=words):
            SegDataset(tmp_path, [item], "val", num_classes=21)[0]


def test_ade_reduce_zero_label(tmp_path):
    Image.fromarray(np.array([[0, 1, 150, 255]], np.uint8)).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", (4, 1), 150, reduce_zero_label=True).tolist() == [[255, 0, 149, 255]]


def test_split_lines_cannot_escape_root(tmp_path):
    for line in ["../x.jpg m.png", "/etc/passwd m.png", "a/../../b.jpg m.png"]:
        (tmp_path / "s.txt").write_text(line + "\n")
        with pytest.raises(UserError, match="escapes the dataset root"):
            read_split(tmp_path / "s.txt")
    (tmp_path / "s.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_split(tmp_path / "s.txt")


def test_packaged_splits_counts():
    counts = {("voc", "92", "labeled"): 92, ("voc", "92", "unlabeled"): 10490, ("voc", "1_8", "labeled"): 1323,
              ("cityscapes", "1_30", "labeled"): 100, ("cityscapes", "1_2", "unlabeled"): 1487,
              ("coco", "1_512", "labeled"): 232, ("ade20k", "1_128", "labeled"): 158}
    for (name, split, kind), n in counts.items():
        assert len(read_split(split_path(name, split, kind, "/nonexistent"), need_masks=True)) == n
    assert len(read_split(split_path("voc", "92", "val", "/nonexistent"))) == 1449
    with pytest.raises(UserError, match="splits of voc: 92, 183"):
        split_path("voc", "93", "labeled", "/nonexistent")


def test_folder_dataset_from_real_voc_samples(tmp_path, shared_data):
    """`folder`: any images/ + masks/ + classes.txt + splits/, here built from the real VOC samples."""
    from semiseg_cli.config import load_config
    from semiseg_cli.data.dataset import build_dataset
    from semiseg_cli.data.splits import write_split

    src = shared_data / "voc_samples"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    pairs = []
    for n in (1, 8, 474):
        (tmp_path / "images" / f"{n}.png").symlink_to(src / f"{n}_image.png")
        (tmp_path / "masks" / f"{n}.png").symlink_to(src / f"{n}_label.png")
        pairs.append((f"images/{n}.png", f"masks/{n}.png"))
    (tmp_path / "classes.txt").write_text((REPO / "semiseg_cli/data/classes/voc.txt").read_text())
    write_split(tmp_path / "splits" / "mine" / "labeled.txt", pairs[:2])
    write_split(tmp_path / "splits" / "mine" / "unlabeled.txt", [(i, None) for i, _ in pairs[2:]])
    write_split(tmp_path / "splits" / "val.txt", pairs)
    cfg = load_config(None, ["dataset.name=folder", f"dataset.root={tmp_path}", "dataset.split=mine", "train.crop_size=64"])
    assert cfg["dataset"]["num_classes"] == 21
    x, y = build_dataset(cfg, "labeled")[1]
    assert x.shape == (3, 64, 64)
    u_w, *_ = build_dataset(cfg, "unlabeled")[0]  # unlabeled lines without masks are accepted
    assert u_w.shape == (3, 64, 64)
    assert set(torch.unique(build_dataset(cfg, "val")[2][1]).tolist()) == {0, 6, 255}
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(UserError, match="classes.txt"):
        load_config(None, ["dataset.name=folder", f"dataset.root={tmp_path}"])


def test_copies_of_a_tiled_labeled_image_get_their_own_crops(tiny_root):
    """SSL epochs tile the labeled list to the unlabeled length (8 -> 16 here): each labeled image comes
    twice per epoch and, as with UniMatch's fresh random draws, each copy is cropped on its own. Seeding
    the crop by the item index instead gave both copies the same crop (the SSL methods then overfitted the
    few labeled crops); the unlabeled images keep one key per image."""
    from semiseg_cli.config import load_config
    from semiseg_cli.data.dataset import build_dataset
    from semiseg_cli.distributed import DistEnv
    from semiseg_cli.engine.trainer import RunSampler

    cfg = load_config(None, [f"dataset.root={tiny_root}", "dataset.name=synthetic", "dataset.split=tiny",
                             "train.crop_size=64"])
    labeled, unlabeled = build_dataset(cfg, "labeled"), build_dataset(cfg, "unlabeled")
    assert (len(labeled), len(unlabeled)) == (8, 16)
    epoch_len, batch = len(unlabeled), 4
    sampler = RunSampler(epoch_len, seed=0, env=DistEnv(), batch=batch, iters_per_epoch=epoch_len // batch,
                         start=0, total=epoch_len // batch)   # one epoch
    keys = list(sampler)
    assert sorted(k[1] for k in keys) == list(range(16)) and {k[0] for k in keys} == {0}
    crops: dict[int, list[torch.Tensor]] = {}
    for key in keys:
        x, _ = labeled[key]
        crops.setdefault(key[1] % 8, []).append(x)
    assert sorted(crops) == list(range(8)) and all(len(c) == 2 for c in crops.values())
    assert all(not torch.equal(a, b) for a, b in crops.values())
    # a key is a pure function of its content: the same key twice gives the same crop
    assert torch.equal(labeled[keys[0]][0], labeled[keys[0]][0])
