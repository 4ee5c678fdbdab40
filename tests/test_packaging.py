"""Packaging: one installed namespace (``ctrlgen``), configs shipped inside it, usable from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ctrlgen.configs import CONFIG_DIR, resolve_config
from tests.conftest import REPO


def _env_without_repo() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return env


def test_resolve_config_finds_packaged_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("ecm/demo_var.yaml") == CONFIG_DIR / "ecm" / "demo_var.yaml"
    assert resolve_config("configs/ecm/demo_var.yaml") == CONFIG_DIR / "ecm" / "demo_var.yaml"
    assert resolve_config("ecm/no_such_recipe.yaml") is None
    own = tmp_path / "ecm" / "demo_var.yaml"  # a file of the user's own wins over the packaged one
    own.parent.mkdir()
    own.write_text("seed_everything: 3\n")
    assert resolve_config("ecm/demo_var.yaml") == Path("ecm/demo_var.yaml")


@pytest.mark.slow
def test_wheel_installs_only_ctrlgen_and_runs_from_another_folder(tmp_path):
    """A plain (non-editable) install puts only ``ctrlgen`` into site-packages; ``ctrlgen fit -c ecm/demo_var.yaml
    --print_config`` works from an unrelated folder with the packaged configs; ``import callbacks`` fails there."""
    src, wheels = tmp_path / "src", tmp_path / "wheels"  # build from a copy: setuptools writes build/ into the tree
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "demo_runs",
                                                              "runs", "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("ctrlgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ctrlgen", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    assert "ctrlgen/configs/base.yaml" in names and "ctrlgen/configs/ecm/demo_var.yaml" in names
    assert "ctrlgen/lightning_modules/ecm/var.py" in names and "ctrlgen/datamodules/base.py" in names

    venv = tmp_path / "venv"  # a fresh venv: the project from the wheel, its dependencies from this environment
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = [p for p in sys.path if p.endswith("site-packages")]  # a plain path entry: this venv's .pth files
    (site / "deps.pth").write_text("\n".join(here) + "\n")       # (the editable install) are not processed
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env_without_repo()
    where = subprocess.run([str(py), "-c", "import ctrlgen.lightning_modules as m; print(m.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the repository
    for name in ("callbacks", "datamodules", "lightning_modules"):
        r = subprocess.run([str(py), "-c", f"import {name}"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode != 0 and "No module named" in r.stderr, (name, r.stderr[-500:])
    r = subprocess.run([str(py), "-m", "ctrlgen.lightning_modules.cli", "fit", "-c", "ecm/demo_var.yaml",
                        "--print_config"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "class_path: ctrlgen.lightning_modules.ecm.VARModule" in r.stdout
    assert "class_path: ctrlgen.callbacks.RunCheckpoint" in r.stdout  # base.yaml, applied first, came along
