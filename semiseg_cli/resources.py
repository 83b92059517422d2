"""Where the recipes and split lists are, for an editable checkout and for an installed wheel alike.

The wheel force-includes the top-level `recipes/` and `data/splits/` as `semiseg_cli/_resources/...`;
a source checkout has them beside the package.
"""
from pathlib import Path

_PKG = Path(__file__).resolve().parent
_CANDIDATES = {
    "recipes": [_PKG / "_resources" / "recipes", _PKG.parent / "recipes"],
    "splits": [_PKG / "_resources" / "splits", _PKG.parent / "data" / "splits"],
}


def resource_dir(name: str) -> Path:
    """Return the folder of a packaged resource ("recipes" or "splits")."""
    for path in _CANDIDATES[name]:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"semiseg is installed without its {name}/ folder (looked in {_CANDIDATES[name]})")
