"""The house's floors: no module imports from a layer above it (checked on the source, not at run time)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "semiseg_cli"
# a module under the key may not import from these packages
ABOVE = {
    "models": ("engine", "cli", "methods", "pseudo"),
    "methods": ("engine", "cli", "pseudo"),
    "convert": ("engine", "cli", "methods", "pseudo"),
    "data": ("engine", "cli", "methods", "models", "convert", "pseudo"),
}
GROUND = ("errors.py", "io.py", "console.py", "resources.py", "crf.py", "distributed.py")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.startswith("semiseg_cli")}


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for layer, above in ABOVE.items():
        for path in (PKG / layer).rglob("*.py"):
            bad += [f"{path.relative_to(PKG)} imports {m}" for m in imports(path)
                    if m.split(".")[1:2] and m.split(".")[1] in above]
    assert not bad, bad


def test_the_ground_floor_imports_only_the_ground_floor():
    ground = {f"semiseg_cli.{g[:-3]}" for g in GROUND}
    for name in GROUND:
        assert imports(PKG / name) <= ground | {"semiseg_cli"}, name


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from semiseg_cli.engine.trainer import train\n")
    assert imports(bad) == {"semiseg_cli.engine.trainer"}
