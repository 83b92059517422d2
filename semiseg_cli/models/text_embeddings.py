"""CLIP text embeddings of class names and class definitions (SemiVL, spec semivl_unimatch.md §4e).

SemiVL compares dense CLIP image features with fixed text embeddings: one prompt per name, the literal
template "a photo of a {name}" (no ensembling), encoded by CLIP ViT-B/16's text tower, each row
L2-normalised. Three variants: `single` (one row per class name), `concept` (one row per concept of a
class definition, in class order; predictions are max-aggregated per class, `max_per_class`) and
`conceptavg` (per class, the mean of its concepts' *unnormalised* embeddings, then L2-normalised).

The text tower comes from the sidecar that `semiseg convert-weights openai-clip|open-clip SRC DST` writes
beside DST: `<DST stem>.text.pt`, a dict of tensors (open_clip's text keys `token_embedding.weight`,
`positional_embedding`, `transformer.resblocks.*`, `ln_final.*`, `text_projection`, optionally
`logit_scale`) plus `meta.quick_gelu` (1 for OpenAI weights). It is rebuilt as open_clip's
`TextTransformer` (config inferred from the shapes) and fed open_clip's offline BPE tokenizer.

Results are cached beside the weights in `<DST stem>.text-cache/<sha1>.pt` (a dict with `embeddings`
[N, E] float32 and `class_index` [N] int64), keyed by the names, template, variant and the sidecar's
size and mtime, so a re-converted sidecar never serves stale embeddings.

Example:
    >>> emb = text_embeddings("weights/clip_vitb16.pt", ["cat", "dog"])          # doctest: +SKIP
    >>> emb.shape                                                                 # doctest: +SKIP
    torch.Size([2, 512])
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from semiseg_cli.errors import UserError
from semiseg_cli.models.prompts import SEMIVL as TEMPLATE

TEXT_SUFFIX = ".text.pt"
CACHE_SUFFIX = ".text-cache"
# keys of open_clip's (OpenAI-layout) text tower, besides transformer.resblocks.*
TEXT_TOP_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection")

Names = Sequence[Union[str, Sequence[str]]]


def text_sidecar(weights_path: str | Path) -> Path:
    """`<stem>.text.pt` beside a converted CLIP file (a sidecar path is returned as is)."""
    p = Path(weights_path)
    return p if p.name.endswith(TEXT_SUFFIX) else p.with_name(p.stem + TEXT_SUFFIX)


def is_text_key(key: str) -> bool:
    return key in TEXT_TOP_KEYS or key == "logit_scale" or key.startswith("transformer.resblocks.")


def text_config(state: dict) -> dict:
    """open_clip text-tower config inferred from the shapes (heads = width // 64, as CLIP)."""
    missing = [k for k in TEXT_TOP_KEYS if k not in state]
    if missing:
        raise UserError(f"not a CLIP text tower (no {missing[0]})")
    width = state["ln_final.weight"].shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    fc = state.get("transformer.resblocks.0.mlp.c_fc.weight")
    return {"context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0], "width": width, "heads": max(width // 64, 1),
            "layers": layers, "mlp_ratio": fc.shape[0] / width if fc is not None else 4.0,
            "output_dim": state["text_projection"].shape[1]}


def build_text_tower(cfg: dict, quick_gelu: bool):
    """open_clip's TextTransformer for `cfg` (random weights; build under `torch.device('meta')` for shapes)."""
    from open_clip.transformer import QuickGELU, TextTransformer
    from torch import nn

    return TextTransformer(**cfg, act_layer=QuickGELU if quick_gelu else nn.GELU)


def load_text_tower(sidecar: Path, device: str | torch.device = "cpu"):
    """The text tower of a sidecar file, in eval mode; (tower, context_length)."""
    from semiseg_cli.io import load_file

    state = load_file(sidecar)
    if not isinstance(state, dict) or "meta.quick_gelu" not in state:
        raise UserError(f"{sidecar}: not a text sidecar of `semiseg convert-weights` (no meta.quick_gelu)")
    quick = bool(int(state["meta.quick_gelu"]))
    weights = {k: v for k, v in state.items() if is_text_key(k) and k != "logit_scale"}
    try:
        cfg = text_config(weights)
    except UserError as e:
        raise UserError(f"{sidecar}: {e}") from None
    with torch.device("meta"):  # shapes only: the sidecar's tensors are adopted below (no random init)
        tower = build_text_tower(cfg, quick)
    tower.load_state_dict(weights, assign=True)
    tower.attn_mask = tower.build_causal_mask()  # a non-persistent buffer: rebuild it off the meta device
    return tower.to(device).eval(), cfg["context_length"]


@torch.no_grad()
def encode(tower, context_length: int, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unnormalised text embeddings [N, E] (float32, CPU) of `texts`, open_clip's tokenizer."""
    import open_clip

    device = next(tower.parameters()).device
    out = [tower(open_clip.tokenize(texts[i:i + batch_size], context_length=context_length).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, tower.output_dim)


def _prompt(template: str, name: str) -> str:
    return template.replace("{name}", "{}").format(name)


def _cached(weights_path: str | Path, key: dict, compute) -> dict:
    from semiseg_cli.console import err
    from semiseg_cli.io import load_file, save_atomic

    sidecar = text_sidecar(weights_path)
    if not sidecar.is_file():
        dst = Path(weights_path) if not Path(weights_path).name.endswith(TEXT_SUFFIX) else \
            sidecar.with_name(sidecar.name[: -len(TEXT_SUFFIX)] + ".pt")
        raise UserError(f"{sidecar}: CLIP text weights not found; `semiseg convert-weights` writes them beside "
                        f"{dst} (e.g. `semiseg convert-weights openai-clip ViT-B-16.pt {dst}`; `sed` for SED)")
    stat = sidecar.stat()
    key = {**key, "sidecar": [stat.st_size, stat.st_mtime_ns]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    stem = sidecar.name[: -len(TEXT_SUFFIX)]
    cache = sidecar.with_name(stem + CACHE_SUFFIX) / f"{digest}.pt"
    if cache.is_file():
        try:
            hit = load_file(cache)
            if isinstance(hit, dict) and {"embeddings", "class_index"} <= set(hit):
                return hit
        except UserError:
            pass  # a torn or foreign cache file: recompute and overwrite it
    result = compute(sidecar)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(result, cache)
    except OSError as e:  # read-only weights folder: still return the embeddings
        err.print(f"warning: could not cache text embeddings in {cache.parent} ({e})", markup=False)
    return result


def flatten_classes(classes: Names) -> tuple[list, list[int]]:
    """(concepts, class index of each): a nested class list flattened one level (a concept stays a name or
    a list of synonyms)."""
    names, index = [], []
    for i, concepts in enumerate(classes):
        concepts = [concepts] if isinstance(concepts, str) else list(concepts)
        if not concepts:
            raise UserError(f"class {i} has no concept names")
        names += concepts
        index += [i] * len(concepts)
    return names, index


def concept_embeddings(weights_path: str | Path, classes: Names, template: str = TEMPLATE, average: bool = False,
                       normalize: bool = True, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of class definitions given as nested lists (class -> concept names; a plain string is
    a one-concept class).

    Args:
        weights_path: a converted CLIP file (its `<stem>.text.pt` sidecar is used) or the sidecar itself.
        classes: e.g. [["background", "wall", "sky"], ["aeroplane"], ["chair", "armchair"]].
        template: the prompt; "{}" (or "{name}") is replaced by each concept.
        average: False (`concept`): one L2-normalised row per concept, in class order;
            True (`conceptavg`): per class the mean of its concepts' unnormalised embeddings, normalised.
        normalize: L2-normalise the rows (False: the raw `encode_text` output, e.g. to average elsewhere).
        device: where the text tower runs.

    Returns:
        (embeddings [M, E] float32, class_index [M] int64): the class of each row (arange(K) if averaged).
    """
    names, index = flatten_classes(classes)
    prompts = [_prompt(template, n) for n in names]

    def compute(sidecar: Path) -> dict:
        tower, ctx = load_text_tower(sidecar, device)
        raw = encode(tower, ctx, prompts)
        idx = torch.tensor(index, dtype=torch.long)
        if average:
            k = len(classes)
            raw = torch.zeros(k, raw.shape[1]).index_add_(0, idx, raw) / torch.bincount(idx, minlength=k)[:, None]
            idx = torch.arange(k)
        return {"embeddings": F.normalize(raw, dim=-1) if normalize else raw, "class_index": idx}

    key = {"classes": [[c] if isinstance(c, str) else list(c) for c in classes], "template": template,
           "average": average, "normalize": normalize}
    out = _cached(weights_path, key, compute)
    return out["embeddings"], out["class_index"]


def ensemble_embeddings(weights_path: str | Path, classes: list, templates: Sequence[str],
                        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-ensembled embeddings of a nested class list (MaskCLIP's, specs/simseg.md §4): a name's embedding
    is the L2-normalised mean of its L2-normalised `encode_text` over every template; a concept given as a
    list of synonyms is the L2-normalised mean of its synonyms' embeddings.

    Args:
        classes: class -> a name, or a list of concepts; a concept is a name or a list of synonyms, e.g.
            ["aeroplane", ["background", ["sky", "clouds"], "wall"]].
        templates: format strings, e.g. `prompts.templates("maskclip")` (85).

    Returns:
        (embeddings [M, E] float32, class_index [M]): one row per concept, in class order.
    """
    concepts, index = flatten_classes(classes)
    synonyms = [[c] if isinstance(c, str) else list(c) for c in concepts]
    if any(not s or not all(isinstance(n, str) for n in s) for s in synonyms):
        raise UserError("a concept must be a name or a non-empty list of synonym names")
    names = [n for s in synonyms for n in s]

    def compute(sidecar: Path) -> dict:
        tower, ctx = load_text_tower(sidecar, device)
        prompts = [_prompt(t, n) for n in names for t in templates]  # name-major
        per_name = F.normalize(F.normalize(encode(tower, ctx, prompts), dim=-1).view(len(names), len(templates), -1)
                               .mean(1), dim=-1)
        rows, start = [], 0
        for s in synonyms:
            rows.append(F.normalize(per_name[start:start + len(s)].mean(0), dim=-1))
            start += len(s)
        return {"embeddings": torch.stack(rows), "class_index": torch.tensor(index, dtype=torch.long)}

    key = {"ensemble": [[c] if isinstance(c, str) else list(c) for c in classes], "templates": list(templates)}
    out = _cached(weights_path, key, compute)
    return out["embeddings"], out["class_index"]


def template_embeddings(weights_path: str | Path, concepts: Sequence[Union[str, Sequence[str]]],
                        templates: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """SED's text input (`SEDPredictor.class_embeddings`, specs/semiovs_sed.md §2.4): per concept and per
    template, the L2-normalised `encode_text` of the prompt; a concept given as synonyms is, per template, the
    L2-normalised mean of its synonyms' normalised embeddings. Nothing is averaged over templates.

    Args:
        concepts: one entry per concept: a name or a list of synonyms, e.g. ["sky", ["aeroplane", "airplane"]].
        templates: format strings, e.g. `prompts.templates("imagenet80")`.

    Returns:
        [T, P, E] float32: T concepts, P templates.
    """
    synonyms = [[c] if isinstance(c, str) else list(c) for c in concepts]
    if not synonyms or any(not s or not all(isinstance(n, str) for n in s) for s in synonyms):
        raise UserError("a concept must be a name or a non-empty list of synonym names")
    templates = list(templates)

    def compute(sidecar: Path) -> dict:
        tower, ctx = load_text_tower(sidecar, device)
        # template-major within a concept, as SED formats them; all concepts' prompts in one encoding pass
        prompts = [_prompt(t, n) for s in synonyms for t in templates for n in s]
        emb = F.normalize(encode(tower, ctx, prompts), dim=-1)
        rows, start = [], 0
        for s in synonyms:
            e = emb[start:start + len(templates) * len(s)].view(len(templates), len(s), -1)
            start += len(templates) * len(s)
            rows.append(F.normalize(e.mean(1), dim=-1) if len(s) > 1 else e[:, 0])
        return {"embeddings": torch.stack(rows), "class_index": torch.arange(len(rows))}

    return _cached(weights_path, {"template_embeddings": synonyms, "templates": templates}, compute)["embeddings"]


def text_embeddings(weights_path: str | Path, names: list[str], template: str = TEMPLATE, normalize: bool = True,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised CLIP text embeddings [N, E] (float32) of `template` filled with each name (`single`).

    Args:
        weights_path: a converted CLIP file (its `<stem>.text.pt` sidecar is used) or the sidecar itself.
        names: class names, e.g. ["background", "aeroplane", ...].
        template: the prompt; SemiVL's is "a photo of a {}".
        normalize: L2-normalise the rows (False: the raw `encode_text` output).
        device: where the text tower runs (the result is on the CPU).

    Example:
        >>> text_embeddings("weights/clip.pt", ["cat", "dog"]).shape                # doctest: +SKIP
        torch.Size([2, 512])
    """
    if any(not isinstance(n, str) for n in names):
        raise UserError("text_embeddings takes a flat list of names; use concept_embeddings for concept lists")
    return concept_embeddings(weights_path, list(names), template, average=False, normalize=normalize, device=device)[0]


def max_per_class(scores: torch.Tensor, class_index: torch.Tensor, num_classes: int, dim: int = 1) -> torch.Tensor:
    """Max over each class's concept channels: scores [..., M, ...] (along `dim`) -> [..., K, ...]."""
    if scores.shape[dim] == num_classes and torch.equal(class_index.cpu(), torch.arange(num_classes)):
        return scores
    shape = list(scores.shape)
    shape[dim] = num_classes
    out = scores.new_full(shape, float("-inf"))
    idx = class_index.to(scores.device).view([-1 if d == dim % scores.ndim else 1 for d in range(scores.ndim)])
    return out.scatter_reduce(dim, idx.expand_as(scores), scores, reduce="amax", include_self=True)
