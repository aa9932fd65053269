"""--calib-augment: seeded views of the calibration images, drawn from the train images' pixels
alone (no label, no validation or test image), and the model a run compresses from them."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

from lora.inits import FitConfig
from lora.reconstruction import NO_RECONSTRUCTION
from tests.conftest import run_driver, run_folder, write_image
from train_evaluate.inputs.images import ImageModel, calibration_views
from train_evaluate.outputs.checkpoint import read_safetensors
from train_evaluate.training import network
from train_evaluate.training.training import FeatureSplit

MODEL = "test_efficientnet"


def images(n: int = 5, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_views_are_the_images_then_seeded_crops_of_each_image_alone():
    pixels = images()
    views = calibration_views(pixels, 3, seed=7)
    assert views.shape == (15, 3, 16, 16) and views.dtype == torch.uint8
    assert torch.equal(views[:5], pixels)
    assert torch.equal(views, calibration_views(pixels, 3, seed=7))
    assert not torch.equal(views, calibration_views(pixels, 3, seed=8))
    assert torch.equal(calibration_views(pixels, 1, seed=7), pixels)
    # a flat image's views are flat in its own colour: every view is cut from its own image
    flat = torch.arange(5, dtype=torch.uint8).mul(40).view(5, 1, 1, 1).expand(5, 3, 16, 16)
    for index, view in enumerate(calibration_views(flat.contiguous(), 4, seed=1)):
        assert (view == 40 * (index % 5)).all()


def setup(train: FeatureSplit, views: int) -> network.NetworkSetup:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.zeros(1, 3, 16, 16))
    plan = SimpleNamespace(
        network=SimpleNamespace(layers=["0"], calib_images=3, calib_augment=views, selection="0",
                                calibration="symmetric", reconstruction=NO_RECONSTRUCTION),
        sweep=SimpleNamespace(seed=0, use_dora=False), include_bias=False, fit=FitConfig(),
    )  # fmt: skip
    wrapped = ImageModel(model, (0.5,) * 3, (0.5,) * 3).eval()
    return network.NetworkSetup.create(plan, wrapped, train, "fp16")


def test_the_calibration_views_never_read_a_label():
    pixels = images(8)
    first = setup(FeatureSplit(pixels, torch.zeros(8, dtype=torch.long)), 3).calibration
    scrambled = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    second = setup(FeatureSplit(pixels, scrambled), 3).calibration
    assert first.shape == (9, 3, 16, 16) and torch.equal(first, second)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / f"{MODEL}.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(timm.create_model(MODEL, pretrained=False).state_dict(), path)
    return path


def test_the_compressed_model_depends_on_the_train_images_alone(
    tmp_path, image_folder, weights, shared_cache, capsys
):
    """The same run twice, the second with every validation and test image replaced by another
    picture: GPTQ's codes and scales, drawn from the calibration views, are the same."""

    def run(folder: Path, results: Path) -> Path:
        code, _, err = run_driver(
            capsys, "--model", MODEL, "--weights", weights, "--data-dir", folder,
            "--layers", "blocks.1.*", "classifier", "--methods", "int3-affine",
            "--ranks", "0", "--epochs", "0",
            "--init", "svd_init", "--quantizer", "gptq", "--int-scale", "mse",
            "--calib-images", "6", "--calib-augment", "3", "--results-dir", results,
            "--cache-dir", shared_cache,
        )  # fmt: skip
        assert code == 0, err
        return run_folder(results, "svd_init_layers-*")

    first = run(image_folder, tmp_path / "first")
    changed = tmp_path / "changed"
    shutil.copytree(image_folder, changed)
    held_out = [
        line.split()[0]
        for name in ("val", "test")
        for line in (first / "split" / f"{name}.txt").read_text().splitlines()
        if line.strip()
    ]
    assert held_out
    for number, image in enumerate(held_out):
        write_image(changed / image, seed=9000 + number)
    second = run(changed, tmp_path / "second")
    name = "checkpoints/quant=int3-affine_r=0.safetensors"
    (_, a), (_, b) = read_safetensors(first / name), read_safetensors(second / name)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("views", ["0", "-1"])
def test_a_view_count_below_one_is_refused(views, capsys, tmp_path):
    code, _, err = run_driver(capsys, "--calib-augment", views, "--results-dir", tmp_path)
    assert code == 2 and "--calib-augment must be at least 1" in err
