"""An installed command writes where it is run, never beside its own package.

The project is installed non-editable into a ``pip install --target`` folder (offline, no
dependencies: they are this environment's), and its console command runs in a temporary
folder: ``results/`` must appear there, and nothing may appear or change inside the installed
package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_folder

REPO = Path(__file__).resolve().parents[1]


def tracked_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the sources to install are not known")
    return [name for name in listed.stdout.splitlines() if (root / name).is_file()]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, modification time). Python's own bytecode caches
    are left out: importing a module may write one, which is not the tool writing."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project installed (not editable) into a --target folder; returns that folder."""
    source = tmp_path_factory.mktemp("source")
    for name in tracked_files(REPO):  # a copy: a build must not write into the checkout
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-compile", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def test_the_installed_command_writes_results_in_the_working_directory(
    installed, tmp_path, demo_cache
):
    work = tmp_path / "work"
    # the session's demo classifier and features, where this folder's run looks for them by
    # default (results/cache): reused only if the default is taken from the working directory
    shutil.copytree(demo_cache, work / "results" / "cache")
    cache_before = snapshot(work / "results" / "cache")
    package_before = snapshot(installed)
    environment = {**os.environ, "PYTHONPATH": str(installed)}
    which = subprocess.run(
        [sys.executable, "-c", "import train_evaluate.train_model as m; print(m.__file__)"],
        cwd=work, env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(which.stdout.strip()).is_relative_to(installed)  # the installed copy runs
    command = installed / "bin" / "lora-compression-train"
    done = subprocess.run(
        [sys.executable, str(command), "--init", "svd_init", "--ranks", "2", "--trials", "1",
         "--epochs", "1"],
        cwd=work, env=environment, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = run_folder(work / "results", "svd_init")
    assert (out / "evaluation.csv").is_file() and (work / "results" / "summary.csv").is_file()
    assert snapshot(work / "results" / "cache") == cache_before  # the cache was found, not rebuilt
    assert snapshot(installed) == package_before
    assert sorted(p.name for p in work.iterdir()) == ["results"]
