"""Prompt templates, in one place: each is a format string whose "{}" takes a class or concept name.

    semivl     SemiVL's single prompt "a photo of a {}" (no period, no ensembling; specs/semivl_unimatch.md §4e)
    maskclip   MaskCLIP's 85: CLIP's 80 ImageNet templates and 5 scene templates (data/prompt_templates/
               maskclip85.json, copied from chongzhou96/MaskCLIP tools/maskclip_utils/prompt_engineering.py,
               Apache-2.0, LICENSE.maskclip beside it; specs/simseg.md §4)
    imagenet80 CLIP's 80 ImageNet templates, SED's `IMAGENET_TEMPLATES` (PROMPT_ENSEMBLE_TYPE imagenet): the first
               80 of maskclip85.json (the same strings in the same order; tests/test_sed.py checks)
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from semiseg_cli.errors import unknown_name

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "data" / "prompt_templates"
SEMIVL = "a photo of a {}"
# name -> (file, how many of its first templates; None: all), or None: the single SEMIVL prompt
TEMPLATE_SETS = {"semivl": None, "maskclip": ("maskclip85.json", None), "imagenet80": ("maskclip85.json", 80)}


@lru_cache(maxsize=None)
def templates(name: str) -> tuple[str, ...]:
    """The templates of set `name` (TEMPLATE_SETS)."""
    if name not in TEMPLATE_SETS:
        raise unknown_name("prompt template set", name, TEMPLATE_SETS)
    if TEMPLATE_SETS[name] is None:
        return (SEMIVL,)
    file, count = TEMPLATE_SETS[name]
    return tuple(json.loads((TEMPLATE_DIR / file).read_text())[:count])
