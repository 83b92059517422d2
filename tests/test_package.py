"""The built wheel carries recipes and split lists: a non-editable install works from any folder."""
import json
import os
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_install_runs_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("semiseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "semiseg_cli/_resources/recipes/supervised-synthetic.yaml" in names
    assert "semiseg_cli/_resources/splits/voc/92/labeled.txt" in names
    assert "semiseg_cli/defaults.yaml" in names and "semiseg_cli/data/classes/ade20k.txt" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def semiseg(*args):
        proc = subprocess.run([sys.executable, "-m", "semiseg_cli", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    where = subprocess.run([sys.executable, "-c", "import semiseg_cli; print(semiseg_cli.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(target)), where  # the installed copy, not the checkout
    recipes = json.loads(semiseg("recipes", "--json"))
    assert recipes
    # the CLI on one recipe per method and dataset, every recipe through the installed package in one process
    families = {name.rsplit("-", 1)[0]: name for name in recipes}
    for name in families.values():
        cfg = json.loads(semiseg("config", "show", "--recipe", name, "--json"))
        assert cfg["method"] and cfg["dataset"]["num_classes"] > 0
    code = ("import json, sys; from semiseg_cli.config import load_config; "
            "print(json.dumps({n: load_config(n)['dataset']['num_classes'] for n in sys.argv[1:]}))")
    proc = subprocess.run([sys.executable, "-c", code, *recipes], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == set(recipes) and all(v > 0 for v in json.loads(proc.stdout).values())
