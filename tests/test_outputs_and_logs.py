"""Output folders are checked before any work, a full disk is one line that names the file it kept, and the
commands say what they did: train's summary and its resume rules, eval's checkpoint, infer's folders,
convert-weights' summary (-v: the key mapping, -q: nothing). The CLI runs in-process through its real
entry point `main()` (exit codes and stderr as a shell sees them)."""
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from semiseg_cli.io import leftover_temps
from tests.conftest import TINY


def tiny_args(root, *extra):
    return [a for s in [f"dataset.root={root}", *TINY, *extra] for a in ("--set", s)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ outputs

def test_out_that_is_a_file_or_under_a_file_is_refused_before_loading_anything(semiseg, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    missing = tmp_path / "missing.pt"  # were it loaded first, the error would name it
    cases = {
        "train": (["train", "--recipe", "supervised-synthetic", "--out", a_file], f"--out {a_file}: is a file"),
        "train --resume": (["train", "--out", a_file / "run", "--resume"], f"{a_file} is a file, so no folder"),
        "infer": (["infer", "--checkpoint", missing, "--images", tmp_path, "--out", a_file], f"--out {a_file}: is a file"),
        "gen-pseudo": (["gen-pseudo", "--model", "checkpoint", "--checkpoint", missing, "--images", tmp_path,
                        "--out", a_file / "sub" / "pseudo"], f"{a_file} is a file, so no folder"),
    }
    for name, (args, words) in cases.items():
        code, out, err = semiseg(*args)
        assert code == 2 and len(err) == 1 and words in err[0] and "missing.pt" not in err[0], (name, err)
    assert a_file.read_text() == "x"


def test_a_read_only_out_folder_is_refused_before_loading_anything(semiseg, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: let the check see what any other user would
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
        code, _, err = semiseg("infer", "--checkpoint", tmp_path / "missing.pt", "--images", tmp_path,
                               "--out", ro / "preds")
        assert code == 2 and len(err) == 1 and f"--out {ro / 'preds'}: {ro} is not writable" in err[0], err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"), (errno.EACCES, "permission denied")])
def test_a_failed_write_keeps_the_previous_file_and_no_temp_file(semiseg, tmp_path, monkeypatch, code, words):
    dst = tmp_path / "w" / "lite0.pt"
    assert semiseg("convert-weights", "efficientnet-lite0", "-", dst, "-q")[0] == 0
    before = sha(dst)

    def fail(fd):  # io.write_atomic fsyncs the temp file before renaming it over dst
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    exit_code, out, err = semiseg("convert-weights", "efficientnet-lite0", "-", dst)
    assert exit_code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"error: {words} writing {dst}; the previous lite0.pt is intact"), err
    assert sha(dst) == before and leftover_temps(dst.parent) == []


def test_disk_full_while_training_keeps_the_last_good_checkpoint(semiseg, tiny_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, saves = os.fsync, []

    def fsync(fd):  # the second save of last.pt (iteration 4) finds the disk full
        if ".last.pt.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            saves.append(fd)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = semiseg("train", "--recipe", "supervised-synthetic", *tiny_args(tiny_root, "train.iters=4",
                                                                                   "train.eval_every=2"), "--out", run)
    assert code == 2 and err[-1] == (f"error: no space left on device writing {run / 'last.pt'}; the previous last.pt "
                                     "is intact; free some space and run again"), err
    from semiseg_cli.engine.checkpoint import load_checkpoint

    assert load_checkpoint(run / "last.pt")["iteration"] == 2  # loads, checksum verified
    assert leftover_temps(run) == [] and not (run / ".lock").exists()


# --------------------------------------------------------------------------------------------- logs

def test_train_eval_infer_say_what_they_did_and_resume_follows_the_schedule(semiseg, tiny_root, tmp_path):
    run = tmp_path / "run"
    code, out, err = semiseg("train", "--recipe", "supervised-synthetic",
                             *tiny_args(tiny_root, "train.iters=4", "train.eval_every=2", "train.log_every=10"),
                             "--out", run)
    assert code == 0, err
    assert any(ln.startswith("eval @ 2 ") and ln.endswith("s)") for ln in err), err  # progress of the periodic eval
    best = torch.load(run / "best.pt", weights_only=True)["iteration"]
    assert err[-3].startswith("done: 4 iterations in ") and err[-3].endswith(f" at iteration {best}"), err
    assert "best mIoU" in err[-3]
    assert err[-2] == f"checkpoints: {run / 'best.pt'} (iteration {best}), {run / 'last.pt'} (iteration 4)"
    assert err[-1] == f"next: semiseg eval --run {run}"

    # a finished run: one line, exit 0, nothing written
    last = sha(run / "last.pt")
    code, out, err = semiseg("train", "--out", run, "--resume")
    assert code == 0 and out == "" and err == [f"{run} is finished (4 of 4 iterations); nothing to do. "
                                               f"Evaluate it with: semiseg eval --run {run}"]
    # another schedule: refused, since the LR of every iteration depends on the total
    code, _, err = semiseg("train", "--out", run, "--resume", "--set", "train.iters=8")
    assert code == 2 and len(err) == 1 and f"{run / 'last.pt'}: the run was planned for 4 iterations" in err[0]
    assert sha(run / "last.pt") == last

    code, out, err = semiseg("eval", "--run", run, "--json")
    assert code == 0 and json.loads(out)["images"] == 6
    assert err[0] == f"evaluating {run / 'best.pt'} (iteration {best} of 4) on synthetic val, mode whole"

    preds = tmp_path / "preds"
    code, out, err = semiseg("infer", "--checkpoint", run / "last.pt", "--images", tiny_root / "images" / "00003.png",
                             "--out", preds, "--overlay")
    assert code == 0 and json.loads(out)["written"] == 1
    assert f"wrote 1 mask(s) to {preds}" in err and f"wrote 1 overlay(s) to {preds / 'overlay'}" in err


def test_convert_weights_prints_a_summary_the_mapping_with_v_and_nothing_with_q(semiseg, tmp_path):
    dst = tmp_path / "lite0.pt"
    mapping_line = "  _blocks.14._project_conv.weight -> blocks.5.3.conv_pwl.weight"
    code, out, err = semiseg("convert-weights", "efficientnet-lite0", "-", dst)
    assert code == 0 and json.loads(out)["keys"] == 296
    assert len(err) == 1 and err[0].startswith("296 source keys: 296 mapped, 0 dropped; wrote ") and "-v" in err[0]
    code, _, err = semiseg("convert-weights", "efficientnet-lite0", "-", dst, "-v")
    assert code == 0 and mapping_line in err and len(err) == 297
    code, out, err = semiseg("convert-weights", "efficientnet-lite0", "-", dst, "-q")
    assert code == 0 and err == [] and json.loads(out)["dst"] == str(dst)
    code, _, err = semiseg("convert-weights", "efficientnet-lite0", "-", dst, "-q", "-v")
    assert code == 2 and err == ["error: pass at most one of -q/--quiet and -v/--verbose"]
