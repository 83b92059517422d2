"""Usage mistakes through the installed `semiseg` console script: one line, exit 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

SEMISEG = Path(sys.executable).with_name("semiseg")


def semiseg(*args) -> subprocess.CompletedProcess:
    assert SEMISEG.is_file(), f"the console script is not installed beside {sys.executable}"
    return subprocess.run([str(SEMISEG), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,expect", [
    (["trian"], "Did you mean 'train'?"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["train"], "pass --recipe"),
    (["eval", "--mode", "bogus"], "'bogus' is not one of whole, slide, slide_sum"),
    (["eval", "--mode", "slid"], "did you mean 'slide'?"),
    (["prepare-data"], "Missing argument 'dataset'"),
    (["train", "--set"], "'--set' requires an argument"),
    (["config", "shwo"], "Did you mean 'show'?"),
    (["prepare-data", "vco", "--root", "/nonexistent"], "did you mean 'voc'?"),
])
def test_a_usage_mistake_is_one_line_and_exit_2(args, expect):
    proc = semiseg(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and expect in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args", [[], ["config"]])
def test_a_bare_command_prints_its_help_and_exits_0(args):
    proc = semiseg(*args)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr + proc.stdout
    assert "Usage: semiseg" in proc.stdout and "Commands" in proc.stdout


def _subcommands() -> list[list[str]]:
    from semiseg_cli.cli import app

    root = typer.main.get_command(app)
    names = []
    for name, cmd in root.commands.items():
        names.append([name])
        names += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return names


def test_every_subcommand_of_the_contract_is_there():
    have = {" ".join(c) for c in _subcommands()}
    assert {"prepare-data", "convert-weights", "gen-pseudo", "train", "eval", "infer", "recipes", "config show"} <= have


@pytest.mark.parametrize("command", _subcommands(), ids=" ".join)
def test_every_subcommand_has_help_with_an_example(command):
    proc = semiseg(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"Usage: semiseg {' '.join(command)}" in proc.stdout
    if command != ["config"]:  # a group: its subcommands carry the examples
        assert "Example" in proc.stdout, proc.stdout


def test_help_lists_come_from_the_registries():
    from semiseg_cli.convert import FORMATS
    from semiseg_cli.data.prepare import CONVERTERS

    convert_help = " ".join(semiseg("convert-weights", "--help").stdout.split())
    prepare_help = " ".join(semiseg("prepare-data", "--help").stdout.split())
    assert all(f in convert_help for f in FORMATS) and all(d in prepare_help for d in CONVERTERS)


def test_shell_completion_is_available():
    proc = semiseg("--show-completion", "bash")
    assert proc.returncode == 0 and "_SEMISEG_COMPLETE" in proc.stdout
    assert "--install-completion" in semiseg("--help").stdout


def test_the_cli_starts_without_importing_torch():
    """`semiseg --help`, a typo, `config show` stay instant: torch is imported by the commands that need it."""
    code = "import sys, semiseg_cli.cli; print(sorted(m for m in ('torch', 'cv2', 'timm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
