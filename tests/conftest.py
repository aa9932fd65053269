"""Shared fixtures: a tiny timm model saved as a local weights file, and a small folder of
generated images under real ImageNet synset names. Nothing here is mocked: the driver loads the
weights through timm's pretrained path and decodes the images with PIL."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Five real synsets, spread over the 1000 classes (indices 0, 1, 100, 500, 999).
SYNSETS = ("n01440764", "n01443537", "n01860187", "n03042490", "n15075141")
TINY_MODEL = "test_vit"


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the tests that take the `device` fixture (default: cpu)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need CUDA: skipped, each with its reason, on a machine without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device ``--device`` names; a CUDA request without CUDA skips the test."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """``test_vit`` (64 -> 1000 classifier, 160 px) with fixed random weights, saved to a file."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(TINY_MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "test_vit.pth"
    torch.save(model.state_dict(), path)
    return path


def write_image(path: Path, seed: int, size: int = 24, fmt: str = "JPEG") -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """8 small JPEGs in each of five real synset folders (40 images)."""
    root = tmp_path_factory.mktemp("imagenet")
    for class_index, synset in enumerate(SYNSETS):
        folder = root / synset
        folder.mkdir()
        for i in range(8):
            write_image(folder / f"{synset}_{i}.JPEG", seed=100 * class_index + i)
    (root / "README.txt").write_text("not an image folder, ignored\n")
    return root


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One feature cache for the driver tests that use the tiny model (saves recomputing)."""
    return tmp_path_factory.mktemp("cache")


def run_driver(capsys, *args: str) -> tuple[int, str, str]:
    """Run train_model.main in-process; returns (exit code, stdout, stderr)."""
    from train_evaluate.train_model import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    sys.stdout.flush()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """The demo classifier and its features, trained and cached once per test session."""
    from train_evaluate.train_model import main

    cache = tmp_path_factory.mktemp("demo-cache")
    scratch = tmp_path_factory.mktemp("warmup")
    assert main(["--epochs", "0", "--methods", "sparse", "--ranks", "2",
                 "--results-dir", str(scratch), "--cache-dir", str(cache)]) == 0  # fmt: skip
    return cache


@pytest.fixture
def own_demo_cache(tmp_path, demo_cache) -> Path:
    """A private copy of ``demo_cache`` for a test that adds caches of its own (whole-network
    image and state caches): the shared one keeps exactly the demo's files."""
    cache = tmp_path / "own-cache"
    cache.mkdir()
    for file in demo_cache.iterdir():
        if file.is_file():
            (cache / file.name).write_bytes(file.read_bytes())
    return cache


def run_folder(results: Path, init: str) -> Path:
    """The one run folder of ``init`` under a results folder (<model>/<data>/<init>)."""
    (folder,) = [p.parent for p in Path(results).glob(f"*/*/{init}/run.json")]
    return folder
