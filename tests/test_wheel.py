"""The package stands alone: a wheel built from this tree, installed outside it, runs `almostlinear inspect
--model gpt` from a folder that is not the repository (nothing may come from examples/, tests/ or the tree)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# offline and quiet: the build uses this environment's setuptools, nothing is downloaded
PIP_ENV = dict(os.environ, HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


def _pip(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q"], cwd=cwd,
                            env=PIP_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel, built once per session from a copy of the sources (the tree gets no build/ folder) and
    installed into a target folder of its own; returns that folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "almostlinear", source / "almostlinear",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _pip("wheel", str(source), "--no-build-isolation", "-w", str(work / "dist"), cwd=work)
    (wheel,) = (work / "dist").glob("almostlinear-*.whl")
    _pip("install", "--target", str(work / "site"), str(wheel), cwd=work)
    return work / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_runs_inspect_gpt_outside_the_repository(installed_wheel, tmp_path):
    where = _run(installed_wheel, tmp_path, "-c",
                 "import importlib.util, almostlinear; print(almostlinear.__file__);"
                 "print(importlib.util.find_spec('examples'))")
    assert where.returncode == 0, where.stderr
    package_file, examples = where.stdout.split()
    assert Path(package_file).resolve().is_relative_to(installed_wheel.resolve()), package_file
    assert examples == "None"  # the repository is not on the import path

    result = _run(installed_wheel, tmp_path, "-m", "almostlinear", "inspect", "--model", "gpt", "--layers", "1",
                  "--seq-len", "16", "--method", "exact", "--inner", "eager")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 attention site(s)" in result.stdout, result.stdout
