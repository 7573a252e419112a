"""The package as a user installs it: a wheel (not an editable checkout) in a fresh virtual environment, asked for
a shipped recipe from a folder that is not the repository: the configs are package data, found by import."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # builds a wheel and a virtual environment: ~30 s
def test_a_built_wheel_answers_a_recipe_from_any_folder(tmp_path):
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(dist.glob("prouigan-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = next((venv / "lib").glob("python3*/site-packages"))
    # the wheel's own files, unpacked as pip installs them; its dependencies from this environment, as a plain path
    # (no .pth of it is processed, so the repository's editable install is not seen)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (target / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    python = str(venv / "bin" / "python")
    code = ("import sys\nfrom prouigan_platform.cli import main\nfrom prouigan_platform.config import config_dir\n"
            "print('configs in', config_dir())\nsys.exit(main(['config', '-c', 'cpu-small']))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"configs in {target}" in out.stdout and "name: cpu-small" in out.stdout, out.stdout[-2000:]
    assert str(REPO) not in out.stdout.split("\n", 1)[0]
    assert Path(target / "pipelines" / "configs" / "cpu-mixed.yaml").is_file()
