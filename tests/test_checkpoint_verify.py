"""Checkpoints verify themselves on load: a checksum of the weights, finite weights, a complete config;
resuming with another model names the first mismatching key. Each failure: exit 2, one line, no traceback."""
import shutil
import struct
import zipfile
import zlib

import pytest
import torch

from semiseg_cli.engine.checkpoint import load_checkpoint
from semiseg_cli.errors import UserError
from semiseg_cli.io import state_checksum
from tests.conftest import TINY, run_cli


def tiny_args(root, *extra):
    return [a for s in [f"dataset.root={root}", *TINY, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def run(tiny_root, tmp_path_factory):
    """One real 2-iteration run (last.pt = best.pt), shared by the tests: they work on copies."""
    out = tmp_path_factory.mktemp("verify") / "run"
    run_cli("train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root, "train.iters=2", "train.eval_every=2"),
            "--out", out, check=0)
    return out


def _one_line(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def _entry_data_offset(path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len


def corrupt_tensor_bytes(src, dst, tensor: torch.Tensor) -> str:
    """Copy the .pt zip `src` to `dst` with 4 bytes inside the storage of `tensor` (found by its bytes)
    flipped. Sizes and offsets stay; the entry's CRC-32 is rewritten in the local header and the central
    directory, so the archive itself is valid and only the content check can notice."""
    shutil.copy(src, dst)
    want = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    with zipfile.ZipFile(dst) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and z.read(i) == want)
        assert info.compress_type == zipfile.ZIP_STORED
        start, size, central = _entry_data_offset(dst, info), info.file_size, z.start_dir
    with open(dst, "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(size))
        mid = size // 2
        data[mid:mid + 4] = bytes(b ^ 0x5A for b in data[mid:mid + 4])
        f.seek(start)
        f.write(data)
        crc = struct.pack("<I", zlib.crc32(data))
        f.seek(info.header_offset + 14)  # local file header: CRC-32 at +14
        f.write(crc)
        # walk the central directory to this entry's record: CRC-32 at +16, name lengths at +28..+33, name at +46
        f.seek(central)
        records = f.read()
        at = 0
        while True:
            assert records[at:at + 4] == b"PK\x01\x02"
            n, m, k = struct.unpack("<HHH", records[at + 28:at + 34])
            if records[at + 46:at + 46 + n] == info.filename.encode():
                break
            at += 46 + n + m + k
        f.seek(central + at + 16)
        f.write(crc)
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None  # every CRC checks out
    return info.filename


def test_saved_checkpoints_carry_a_checksum(run):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        assert ckpt["checksum"] == state_checksum(ckpt["model"])
    assert load_checkpoint(run / "last.pt")["iteration"] == 2


def test_flipped_bytes_inside_a_weight_are_caught(run, tmp_path):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    key = max(ckpt["model"], key=lambda k: ckpt["model"][k].numel())
    bad = tmp_path / "bad.pt"
    corrupt_tensor_bytes(run / "best.pt", bad, ckpt["model"][key])
    changed = torch.load(bad, weights_only=True)["model"]
    assert not torch.equal(changed[key], ckpt["model"][key])  # torch itself loads it without complaint
    with pytest.raises(UserError, match="checksum mismatch"):
        load_checkpoint(bad)
    _one_line(run_cli("eval", "--checkpoint", bad), str(bad), "corrupted: checksum mismatch")


def test_nan_weight_is_caught_with_its_key(run, tmp_path):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.numel() > 1)
    ckpt["model"][key].view(-1)[1] = float("nan")
    ckpt["checksum"] = state_checksum(ckpt["model"])  # a consistent file: only the NaN is wrong
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    _one_line(run_cli("eval", "--checkpoint", bad), str(bad), key, "NaN")
    del ckpt["checksum"]  # an older checkpoint (no checksum) is checked for NaN / Inf too
    ckpt["model"][key].view(-1)[1] = float("inf")
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match=f"weight {key} holds NaN or Inf"):
        load_checkpoint(bad)


def test_checkpoint_without_checksum_still_loads(run, tmp_path):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    del ckpt["checksum"]  # as written before checksums
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert "checksum" not in load_checkpoint(old)
    proc = run_cli("eval", "--checkpoint", old, "--json", check=0)
    assert '"miou"' in proc.stdout


def test_incomplete_or_invalid_config_names_the_file_and_key(run, tmp_path):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    # a key the schema gained after the file was written (here: removed) takes its default: old runs still load
    del ckpt["config"]["crf"]["iters"]
    del ckpt["config"]["ssl"]["mix_source"]
    bad = tmp_path / "nokey.pt"
    torch.save(ckpt, bad)
    loaded = load_checkpoint(bad)["config"]
    assert loaded["crf"]["iters"] == 10 and loaded["ssl"]["mix_source"] == "same"
    assert '"miou"' in run_cli("eval", "--checkpoint", bad, "--json", check=0).stdout
    ckpt["config"]["crf"]["iters"] = 10
    ckpt["config"]["optim"]["lr"] = -1.0
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match=r"nokey\.pt: config: optim\.lr = -1\.0 is out of range"):
        load_checkpoint(bad)
    ckpt["config"] = ["not", "a", "mapping"]
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match=r"nokey\.pt: its config is not a mapping"):
        load_checkpoint(bad)


def test_resume_with_another_architecture_names_a_key(run, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(run, part)
    proc = run_cli("train", "--out", part, "--resume", "--set", "model.backbone=resnet34", "--set", "train.iters=4")
    _one_line(proc, str(part / "last.pt"), "do not fit", "missing keys (e.g. backbone.layer")
    proc = run_cli("train", "--out", part, "--resume", "--set", "model.head_channels=8", "--set", "train.iters=4")
    _one_line(proc, "shape mismatches (e.g. head.")
    assert not (part / ".lock").exists()  # released on the error
