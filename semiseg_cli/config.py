"""Configuration: defaults.yaml -> recipe -> `--set key=value` overrides, checked against one schema.

The schema is defaults.yaml itself: a key exists iff it has a default there, and its type is the
default's type (`NULLABLE` gives the type of keys whose default is null; `OPEN` lists mappings whose
sub-keys are free). Unknown keys, wrong types and bad choices raise UserError with a did-you-mean;
every numeric key has its valid interval in `RANGES` (a test checks that none lacks one).

Example:
    >>> cfg = load_config("supervised-synthetic", ["train.iters=100"])
    >>> cfg["train"]["iters"]
    100
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml

from semiseg_cli.data.facts import DATASETS, class_names, default_root
from semiseg_cli.errors import did_you_mean
from semiseg_cli.errors import UserError
from semiseg_cli.resources import resource_dir

DEFAULTS = Path(__file__).parent / "defaults.yaml"

# Types of keys whose default is null (or that may be set null, like simseg.vocab_size).
NULLABLE = {
    "dataset.root": str, "dataset.num_classes": int, "dataset.ood_list": str, "dataset.ood_root": str, "model.weights": str, "model.init_checkpoint": str, "train.iters": int,
    "eval.crop": int, "eval.stride": int, "eval.resize_short": int, "model.class_text": str,
    "model.conv_encoder": str, "model.conv_encoder_weights": str, "ssl.guidance_text": str,
    "optim.bias_weight_decay": float, "eval.img_scale": list, "dataset.image_labels": str,
    "simseg.vit_depth": int, "simseg.vit_width": int, "simseg.vit_heads": int, "simseg.vocab": str,
    "captions.path": str, "captions.image_column": str, "captions.chunk": int, "simseg.vit_patch": int,
    "simseg.table_size": int, "simseg.text_weights": str, "simseg.vocab_size": int,  # vocab_size null: the vocabulary's line count
}
# The shape of list keys whose default is null (a value must look like this).
NULLABLE_LIST_SHAPE = {"eval.img_scale": [2048, 512],
}
# Lists of any length (at least the minimum given), each item of the type of the default's first item.
VARIABLE_LENGTH = {"eval.scales": 1, "slrnet.pamr_dilations": 1, "train.keep_epochs": 0}
# Mappings whose sub-keys are not fixed by the schema (values must still be numbers).
OPEN = {"optim.lr_mult": float}
CHOICES = {
    "dataset.name": list(DATASETS),
    "train.amp": ["bf16", "fp16", "off"],
    "train.resize": ["long", "short"],
    "train.labeled_loss": ["ce", "ohem"],
    "optim.name": ["sgd", "adamw"],  # engine/optim.py OPTIMIZERS (a test checks)
    "optim.schedule": ["poly", "cosine", "constant_then_cosine"],  # engine/optim.py SCHEDULES (a test checks)
    "eval.mode": ["whole", "slide", "slide_sum"],
    "ssl.s4mc_base": ["fixmatch", "unimatch"],
    "ssl.s4mc_neighbourhood": [4, 8],
    "ssl.conf_mode": ["pixelwise", "pixelavg"],
    "ssl.mix_source": ["same", "shuffled"],
    "ssl.ood_base": ["unimatch", "prevmatch", "semivl"],  # = methods/semiovs.py BASES
    "slrnet.variant": ["wss", "semi_cls", "semi_nocls"],  # = methods/slrnet.py VARIANTS
    "eval.image_labels": ["predict", "given"],
    "simseg.pool": ["loda", "avg", "cls"],  # = models/simseg.py POOLS
    "model.vit_act": ["gelu", "quick_gelu"],
    # = models/smp.py ARCHS, spelled out so that reading a config never imports torch (tests/test_smp.py checks)
    "model.arch": ["Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet", "PAN",
                   "UPerNet", "Segformer"],
    "model.output_stride": [8, 16, 32],  # timm's dilated encoders
}
INF = None  # an unbounded end of a range
# key -> (low, high, brackets): the interval of a numeric key in interval notation, "[" / "]" closed, "(" / ")"
# open, None unbounded; e.g. (0, 1, "[)") is 0 <= x < 1. A list key's bound applies to each element, an OPEN
# mapping's to each value; null stays allowed where the default is null. Every numeric key of defaults.yaml
# is listed (keys in CHOICES excepted; tests/test_config_ranges.py checks).
RANGES: dict[str, tuple] = {
    "dataset.num_classes": (1, INF, "[)"),
    "model.head_channels": (1, INF, "[)"),
    "model.vit_ln_eps": (0, INF, "()"),
    "model.maskclip_pd": (0, 1, "[]"),          # softmax-probability thresholds
    "model.maskclip_ks": (0, 1, "[]"),
    "train.crop_size": (16, INF, "[)"),         # smaller crops vanish at the encoders' stride
    "train.global_batch": (1, INF, "[)"),
    "train.epochs": (1, INF, "[)"),
    "train.iters": (1, INF, "[)"),
    "train.seed": (0, 2**32 - 1, "[]"),        # numpy's seed range
    "train.eval_every": (1, INF, "[)"),
    "train.log_every": (1, INF, "[)"),
    "train.workers": (0, INF, "[)"),
    "train.scale_range": (0, INF, "()"),       # and low <= high (ORDERED)
    "train.img_scale": (1, INF, "[)"),
    "train.ohem_thresh": (0, 1, "[]"),
    "train.ohem_min_kept": (0, INF, "[)"),
    "optim.lr": (0, INF, "()"),
    "optim.weight_decay": (0, INF, "[)"),
    "optim.momentum": (0, 1, "[)"),
    "optim.betas": (0, 1, "[)"),
    "optim.eps": (0, INF, "()"),
    "optim.lr_mult": (0, INF, "[)"),           # 0 freezes a group
    "optim.bias_lr_factor": (0, INF, "[)"),
    "optim.bias_weight_decay": (0, INF, "[)"),
    "optim.poly_power": (0, INF, "[)"),
    "optim.warmup": (0, 1, "[]"),              # a fraction of the iterations
    "optim.cosine_floor": (0, 1, "[]"),
    "optim.constant_epochs": (0, INF, "[)"),
    "ssl.conf_thresh": (0, 1, "[]"),
    "ssl.s4mc_drop_percent": (0, 100, "[]"),
    "ssl.prev_conf_thresh": (0, 1, "[]"),
    "ssl.prev_pool_size": (1, INF, "[)"),
    "ssl.prev_max_models": (1, INF, "[)"),
    "ssl.guidance_conf": (0, 1, "[]"),
    "ssl.guidance_weight": (0, INF, "[)"),
    "ssl.ood_weight": (0, INF, "[)"),
    "eval.crop": (1, INF, "[)"),
    "eval.stride": (1, INF, "[)"),
    "eval.resize_short": (1, INF, "[)"),
    "eval.img_scale": (1, INF, "[)"),
    "eval.scales": (0, INF, "()"),
    "eval.fp_cut": (0, 1, "[]"),
    "eval.topk_classes": (1, INF, "[)"),
    "eval.bg_pow": (0, INF, "()"),
    "model.cvlr_iters": (1, INF, "[)"),
    "model.deep_stage": (-1, INF, "[)"),         # a timm stage index (-1 = the last)
    "slrnet.view_scale": (0, 1, "(]"),
    "slrnet.crop_scale": (0, 1, "(]"),         # and low <= high (ORDERED)
    "train.keep_epochs": (0, INF, "[)"),
    "slrnet.loss_coeff": (0, INF, "[)"),
    "slrnet.pretrain_epochs": (0, INF, "[)"),
    "slrnet.oversample": (1, INF, "[)"),
    "slrnet.cutoff_top": (0, 1, "[]"),
    "slrnet.cutoff_low": (0, 1, "[]"),
    "slrnet.bg_factor": (0, 1, "[]"),
    "slrnet.pamr_iters": (0, INF, "[)"),
    "slrnet.pamr_dilations": (1, INF, "[)"),
    "slrnet.pamr_bg_pow": (0, INF, "()"),
    "slrnet.aux_weight": (0, INF, "[)"),
    "simseg.vit_depth": (1, INF, "[)"),
    "simseg.vit_width": (1, INF, "[)"),
    "simseg.vit_heads": (1, INF, "[)"),
    "simseg.vit_patch": (1, INF, "[)"),
    "simseg.cnn_stage": (-1, INF, "[)"),
    "simseg.vocab_size": (5, INF, "[)"),        # BERT's five special tokens at least
    "simseg.text_layers": (1, INF, "[)"),
    "simseg.text_width": (1, INF, "[)"),
    "simseg.text_heads": (1, INF, "[)"),
    "simseg.text_mlp": (1, INF, "[)"),
    "simseg.text_dropout": (0, 1, "[)"),
    "simseg.max_length": (3, 512, "[]"),       # [CLS] + a word piece + [SEP]; BERT's 512 positions
    "simseg.embed_dim": (1, INF, "[)"),
    "simseg.image_k": (1, INF, "[)"),
    "simseg.text_k": (1, INF, "[)"),
    "simseg.temperature": (1e-3, 0.5, "[]"),   # its clamp
    "simseg.image_size": (16, INF, "[)"),
    "simseg.table_size": (16, INF, "[)"),
    "simseg.retrieval_resize": (16, INF, "[)"),
    "simseg.top_m": (1, INF, "[)"),
    "simseg.sigma": (0, INF, "[)"),            # theta = mean + sigma x std: 0 = the mean
    "simseg.walk": (1, INF, "[)"),
    "captions.augment_p": (0, 1, "[]"),
    "captions.crop_scale": (0, 1, "(]"),      # and low <= high (ORDERED)
    "captions.chunk": (1, INF, "[)"),
    "crf.iters": (0, INF, "[)"),
    "crf.gauss_sxy": (0, INF, "()"),
    "crf.gauss_compat": (0, INF, "[)"),
    "crf.bilateral_sxy": (0, INF, "()"),
    "crf.bilateral_srgb": (0, INF, "()"),
    "crf.bilateral_compat": (0, INF, "[)"),
}
# [low, high] list keys: also low <= high.
# model.name -> the one method that trains it, and back (SLRNet's network has no FP stream for the SSL methods,
# and its method needs its two-view network; SimSeg learns from image-caption pairs); models/__init__.py re-exports it
OWN_METHOD = {"slrnet": "slrnet", "simseg": "simseg"}
ORDERED = {"train.scale_range", "slrnet.crop_scale", "captions.crop_scale"}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans ("off" stays a string), no "1_8" -> 18 ints,
    and "1e-4" is a float."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}:{at} invalid YAML ({getattr(e, 'problem', e)})") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; OPEN mappings stay whole."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in OPEN:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def get(cfg: dict, key: str) -> Any:
    """Value of a dotted key, e.g. get(cfg, "train.crop_size")."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value


def defaults() -> dict:
    return load_yaml(DEFAULTS)


def _schema() -> dict[str, Any]:
    return flatten(defaults())


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    """Check `value` against the type of `default` (or NULLABLE[key]); return the converted value."""
    want = NULLABLE.get(key) if default is None else type(default)
    if value is None:
        if default is None or key in NULLABLE:  # a key with a default that may still be null
            return None
        raise UserError(f"{where}: {key} cannot be null (default {default!r})")
    if key in OPEN:
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise UserError(f"{where}: {key} must be a mapping of names to numbers, e.g. {default}")
        return {str(k): float(v) for k, v in value.items()}
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)  # split names like 92 arrive as ints
    elif want is list:
        default = NULLABLE_LIST_SHAPE[key] if default is None else default
        if key in VARIABLE_LENGTH and isinstance(value, list) and len(value) >= VARIABLE_LENGTH[key]:
            item = default[0] if default else 0
            return [_coerce(f"{key}[{i}]", v, item, where) for i, v in enumerate(value)]
        if isinstance(value, list) and len(value) == len(default):
            return [_coerce(f"{key}[{i}]", v, d, where) for i, (v, d) in enumerate(zip(value, default))]
        raise UserError(f"{where}: {key} must be a list of {len(default)} values like {default}, got {value!r}")
    raise UserError(f"{where}: {key} must be {want.__name__}, got {value!r} ({type(value).__name__})")


def describe_range(key: str) -> str:
    """RANGES[key] in words: ">= 1", "> 0", "in [0, 1)"."""
    low, high, brackets = RANGES[key]
    if high is None:
        return f"{'>=' if brackets[0] == '[' else '>'} {low}"
    if low is None:
        return f"{'<=' if brackets[1] == ']' else '<'} {high}"
    return f"in {brackets[0]}{low}, {high}{brackets[1]}"


def _in_range(value: Any, low, high, brackets: str) -> bool:
    # written so that NaN fails every bound; inf fails too (no numeric key may be infinite)
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above = low is None or (value >= low if brackets[0] == "[" else value > low)
    below = high is None or (value <= high if brackets[1] == "]" else value < high)
    return above and below


def check_range(key: str, value: Any, default: Any, where: str) -> None:
    """Raise a one-line UserError when a (coerced) value is outside RANGES[key] or an ORDERED pair is
    reversed; null, where allowed, was already admitted by `_coerce`."""
    if key not in RANGES or value is None:
        return
    if isinstance(value, dict):  # an OPEN mapping
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(key, value)]
    hint = f"default {'null' if default is None else repr(default)}"
    for name, v in items:
        if not _in_range(v, *RANGES[key]):
            nullable = " or null" if key in NULLABLE and name == key else ""
            raise UserError(f"{where}: {name} = {v!r} is out of range: it must be {describe_range(key)}{nullable} "
                            f"({hint})")
    if key in ORDERED and value[0] > value[1]:
        raise UserError(f"{where}: {key} = {value!r} is reversed: it is [low, high] with 0 < low <= high ({hint})")


def _suggest_key(key: str, schema) -> str:
    """Prefer a key with the same last part ("train.lr" -> "optim.lr"), else the closest spelling."""
    same_leaf = [k for k in schema if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    return f" (did you mean {same_leaf[0]!r}?)" if len(same_leaf) == 1 else did_you_mean(key, schema)


def _apply(cfg: dict, updates: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    for key, value in updates.items():
        if key not in schema:
            # a partial key such as "optim.lr_mult.head" addresses one entry of an OPEN mapping
            head = key.rsplit(".", 1)[0]
            if head in OPEN:
                value = {**get(cfg, head), key.rsplit(".", 1)[1]: value}
                key = head
            else:
                raise UserError(f"{where}: unknown config key {key!r}{_suggest_key(key, schema)}; "
                                "`semiseg config show` lists every key")
        value = _coerce(key, value, schema[key], where)
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{where}: {key} = {value!r} is not one of {', '.join(map(str, CHOICES[key]))}"
                            f"{did_you_mean(value, CHOICES[key])}")
        check_range(key, value, schema[key], where)
        _set(cfg, key, value)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("recipes").glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """A recipe name (see `semiseg recipes`) or a path to a YAML file."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"{recipe}: recipe file not found")
        return path
    path = resource_dir("recipes") / f"{recipe}.yaml"
    if not path.is_file():
        raise UserError(f"unknown recipe {recipe!r}{did_you_mean(recipe, recipe_names())}; `semiseg recipes` lists them")
    return path


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["train.iters=100", "optim.lr=1e-3"] -> {"train.iters": 100, "optim.lr": 0.001} (values are YAML)."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set train.iters=1000")
        out[key.strip()] = parse_yaml(text, f"--set {key.strip()}") if text.strip() else None
    return out


def check_stored(cfg: Any, where: str) -> dict:
    """A stored resolved config (a checkpoint's), completed and checked: keys the schema gained after the file
    was written take their defaults (so older checkpoints keep loading; every default keeps the earlier
    behaviour), present keys must have a valid type, choice and range. Keys the schema does not know are
    ignored (a newer or older semiseg may have written them). Returns the completed config."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: its config is not a mapping of config keys; pass best.pt or last.pt of a run")
    schema = _schema()
    flat = flatten(cfg)
    out = defaults()
    _apply(out, {k: flat[k] for k in schema if k in flat}, schema, f"{where}: config")
    return out


def load_config(recipe: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> dict:
    """Resolve a config: defaults (or `base`, e.g. a checkpoint's config) -> recipe -> overrides.

    Args:
        recipe: a recipe name or YAML path, or None for the defaults alone.
        overrides: "key=value" strings; values are parsed as YAML.
        base: start from this resolved config instead of the defaults.

    Returns:
        The resolved config as a nested dict (dataset.num_classes and dataset.root filled in).
    """
    schema = _schema()
    cfg = copy.deepcopy(base) if base is not None else defaults()
    if recipe:
        path = recipe_path(recipe)
        _apply(cfg, flatten(load_yaml(path)), schema, str(path))
    if overrides:
        _apply(cfg, parse_overrides(overrides), schema, "--set")
    return resolve(cfg)


def resolve(cfg: dict) -> dict:
    """Fill in derived values and check cross-key rules."""
    from semiseg_cli.methods import METHODS

    if cfg["method"] not in METHODS:
        raise UserError(f"method {cfg['method']!r} is not available{did_you_mean(cfg['method'], METHODS)}; "
                        f"choose one of: {', '.join(METHODS)}")
    model, method = cfg["model"]["name"], cfg["method"]
    for m, meth in OWN_METHOD.items():
        if (model == m) != (method == meth):
            raise UserError(f"method {method!r} with model.name {model!r}: model.name={m} is trained by method={meth} "
                            f"only, and method={meth} needs model.name={m}; set both")
    ds = cfg["dataset"]
    if ds["root"] is None:
        ds["root"] = str(default_root(ds["name"]))
    n = len(class_names(ds["name"], ds["root"]))
    if ds["num_classes"] is None:
        ds["num_classes"] = n
    elif ds["num_classes"] != n:
        raise UserError(f"dataset.num_classes = {ds['num_classes']} but {ds['name']} has {n} classes")
    s = cfg["simseg"]
    if s["vocab_size"] is None and s["vocab"]:  # filled in from the vocabulary, as num_classes from the class list
        vocab = Path(s["vocab"]).expanduser()
        vocab = vocab / "vocab.txt" if vocab.is_dir() else vocab
        if vocab.is_file():  # else the model's builder names the missing file
            s["vocab_size"] = len(vocab.read_bytes().decode("utf-8", errors="replace").splitlines())
    return cfg  # (train.global_batch >= 1 and train.crop_size >= 16 are in RANGES)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# config keys holding file or folder paths: a run stores them absolute (see absolute_paths)
PATH_KEYS = ("dataset.root", "dataset.ood_list", "dataset.ood_root", "model.weights", "model.conv_encoder_weights",
             "model.init_checkpoint", "simseg.vocab", "simseg.text_weights",
             "captions.path")


def absolute_paths(cfg: dict) -> dict:
    """`cfg` with its path keys made absolute and resolved against the current folder, as a run stores them:
    its config.yaml, checkpoints and hints then mean the same files from any folder."""
    out = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        try:
            value = get(out, key)
        except (KeyError, TypeError):  # a partial config (tests of the trainer's parts)
            continue
        if value:
            _set(out, key, str(Path(value).expanduser().resolve()))
    return out
