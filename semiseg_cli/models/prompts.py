"""Prompt templates, in one place: each is a format string whose "{}" takes a class or concept name.

    semivl     SemiVL's single prompt "a photo of a {}" (no period, no ensembling; specs/semivl_unimatch.md §4e)
    maskclip   MaskCLIP's 85: CLIP's 80 ImageNet templates and 5 scene templates (data/prompt_templates/
               maskclip85.json, copied from chongzhou96/MaskCLIP tools/maskclip_utils/prompt_engineering.py,
               Apache-2.0, LICENSE.maskclip beside it; specs/simseg.md §4)
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from semiseg_cli.errors import unknown_name

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "data" / "prompt_templates"
SEMIVL = "a photo of a {}"
TEMPLATE_SETS = {"semivl": None, "maskclip": "maskclip85.json"}  # None: the single SEMIVL prompt


@lru_cache(maxsize=None)
def templates(name: str) -> tuple[str, ...]:
    """The templates of set `name` (TEMPLATE_SETS)."""
    if name not in TEMPLATE_SETS:
        raise unknown_name("prompt template set", name, TEMPLATE_SETS)
    if TEMPLATE_SETS[name] is None:
        return (SEMIVL,)
    return tuple(json.loads((TEMPLATE_DIR / TEMPLATE_SETS[name]).read_text()))
