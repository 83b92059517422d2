"""SED's released checkpoint (`sed_model_large.pth`, detectron2) -> the `models/sed.py` SED plus a text sidecar.

The file is detectron2's `{"model": state_dict}` or a bare state dict, DDP `module.` prefixes stripped. Its
658 tensors (SED-L) sit under two prefixes, matched as whole prefixes (the CLIP text tower's own keys
`...clip_model.transformer.*` also contain `.transformer.`):

    sem_seg_head.predictor.clip_model.visual.<k>   -> visual.<k>        (fine-tuned image tower)
    sem_seg_head.predictor.clip_model.<text key>   -> text:<text key>   (sidecar <DST stem>.text.pt)
    sem_seg_head.predictor.transformer.<k>         -> transformer.<k>   (the aggregator)

Every key must be used, and the result must have exactly the keys and shapes of the SED built for the
architecture read from the shapes (depths, widths, embedding size, aggregator widths and kernels); the
architecture is stored as `meta.*` int tensors (`SED.from_file`). The text sidecar holds open_clip's text keys
and `meta.quick_gelu` 0 (LAION's ConvNeXt CLIP uses GELU); SED froze the text tower, so it equals the public
laion2b_s29b_b131k_ft_soup text weights.
"""
from __future__ import annotations

import re

import torch

from semiseg_cli.convert.common import Converted, check_and_report, unwrap_state_dict
from semiseg_cli.errors import UserError
from semiseg_cli.io import load_file
from semiseg_cli.models.sed import SED, SED_L, arch_meta
from semiseg_cli.models.text_embeddings import TEXT_SUFFIX, is_text_key

TARGET_KIND = ""  # the summary line names SED itself
CLIP = "sem_seg_head.predictor.clip_model."
AGGREGATOR = "sem_seg_head.predictor.transformer."


def _shape(state: dict, key: str, src: str) -> torch.Size:
    if key not in state:
        raise UserError(f"{src}: not a SED checkpoint (no {key})")
    return state[key].shape


def infer_arch(visual: dict, agg: dict, src: str) -> dict:
    """The SED architecture from the shapes of the prefix-stripped `visual.*` and aggregator keys."""
    depths, dims = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in visual if (m := re.match(rf"trunk\.stages\.{i}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise UserError(f"{src}: not a SED checkpoint (no {CLIP}visual.trunk.stages.{i}.blocks.*)")
        depths.append(max(blocks) + 1)
        dims.append(_shape(visual, f"trunk.stages.{i}.blocks.0.conv_dw.weight", src)[0])
    hidden, prompt_channel = _shape(agg, "conv1.weight", src)[:2]
    return {"depths": depths, "dims": dims, "embed_dim": _shape(visual, "head.mlp.fc2.weight", src)[0],
            "mlp_hidden": _shape(visual, "head.mlp.fc1.weight", src)[0], "prompt_channel": prompt_channel,
            "hidden_dim": hidden,
            "decoder_dims": [_shape(agg, f"decoder{i}.conv.double_conv.0.weight", src)[0] for i in (1, 2, 3)],
            "guidance_proj_dims": [_shape(agg, f"decoder_guidance_projection.{i}.0.weight", src)[0] for i in (0, 1, 2)],
            "kernel_sizes": [_shape(agg, f"decoder{i}.cnext.dwconv.weight", src)[-1] for i in (1, 2, 3)],
            "num_heads": SED_L["num_heads"]}  # not in the weights: SED's NUM_HEADS


def convert(fmt: str, src: str, backbone: str | None = None) -> Converted:
    if backbone is not None:
        raise UserError("--backbone does not apply to the sed format (the architecture is read from the file)")
    source = unwrap_state_dict(load_file(src), src)
    source = {k[len("module."):] if k.startswith("module.") else k: v for k, v in source.items()}
    mapping, state, text, visual, agg = [], {}, {}, {}, {}
    for key, value in source.items():
        if key.startswith(CLIP + "visual."):
            new = key[len(CLIP):]
            visual[new[len("visual."):]] = value
        elif key.startswith(CLIP) and is_text_key(key[len(CLIP):]):
            new = "text:" + key[len(CLIP):]
            text[key[len(CLIP):]] = value.float()
        elif key.startswith(AGGREGATOR):
            new = "transformer." + key[len(AGGREGATOR):]
            agg[key[len(AGGREGATOR):]] = value
        else:
            continue  # reported as unused by check_and_report
        mapping.append((key, new))
        if not new.startswith("text:"):
            state[new] = value.float()
    arch = infer_arch(visual, agg, src)
    with torch.device("meta"):  # shapes and names only
        reference = SED(arch).state_dict()
    check_and_report(mapping, source, state, reference, f"SED {arch['depths']} / {arch['dims']}")
    if not text:
        raise UserError(f"{src}: no CLIP text tower ({CLIP}transformer.resblocks.*, token_embedding.weight, ...)")
    text["meta.quick_gelu"] = torch.tensor(0)
    return Converted({**state, **arch_meta(arch)}, mapping, f"SED (depths {arch['depths']}, dims {arch['dims']})",
                     sidecars={TEXT_SUFFIX: text})
