"""The feature cache: features reproduce the model's logits; damaged caches and images are
detected, never trusted."""

import shutil

import pytest
import timm
import torch

from data import scan_imagenet_folder
from tests.conftest import SYNSETS, TINY_MODEL
from train_evaluate.backbone import classifier, create_backbone, eval_transform
from train_evaluate.features import cache_path, cached_features, extract_features, load_features

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbone(tiny_weights):
    return create_backbone(TINY_MODEL, tiny_weights, CPU)


def test_local_weights_go_through_timms_pretrained_path(backbone, tiny_weights):
    reference = torch.load(tiny_weights, weights_only=True)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in reference.items())
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_cached_features_reproduce_the_models_logits(backbone, image_folder):
    source = scan_imagenet_folder(image_folder)
    transform = eval_transform(backbone)
    cached = extract_features(backbone, source, transform, CPU, batch_size=16)
    assert cached.features.shape == (40, backbone.num_features)
    assert cached.labels.tolist() == list(source.labels) and cached.ids == source.ids
    images = torch.stack([transform(source.load(i)) for i in (0, 17, 39)])
    with torch.inference_mode():
        expected = backbone(images)
    head = classifier(backbone)
    from_cache = cached.features[[0, 17, 39]] @ head.weight.T + head.bias
    torch.testing.assert_close(from_cache, expected, rtol=1e-4, atol=1e-4)


def test_preprocessing_is_timms_data_config(backbone):
    config = timm.data.resolve_data_config({}, model=backbone)
    text = repr(eval_transform(backbone))
    assert f"CenterCrop(size=({config['input_size'][1]}, {config['input_size'][2]}))" in text
    assert "bicubic" in text and "0.5000" in text  # test_vit: bicubic, mean = std = 0.5


def test_the_cache_is_reused_and_a_damaged_one_is_rebuilt(backbone, image_folder, tmp_path, caplog):
    source = scan_imagenet_folder(image_folder)
    calls = []

    def compute():
        calls.append(1)
        return extract_features(backbone, source, eval_transform(backbone), CPU)

    first, reused = cached_features(tmp_path, "key-a", compute)
    assert not reused and len(calls) == 1
    second, reused = cached_features(tmp_path, "key-a", compute)
    assert reused and len(calls) == 1 and torch.equal(first.features, second.features)

    path = cache_path(tmp_path, "key-a")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated by a crash
    assert load_features(path, "key-a") is None
    assert "damaged" in caplog.text
    third, reused = cached_features(tmp_path, "key-a", compute)
    assert not reused and len(calls) == 2 and torch.equal(third.features, first.features)

    # a file renamed into place for another key is not trusted either
    shutil.copy(path, cache_path(tmp_path, "key-b"))
    assert load_features(cache_path(tmp_path, "key-b"), "key-b") is None


def test_unreadable_images_are_skipped_and_listed(backbone, image_folder, tmp_path, caplog):
    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    broken = folder / SYNSETS[1] / f"{SYNSETS[1]}_3.JPEG"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    (folder / SYNSETS[2] / "empty.jpg").write_bytes(b"")
    source = scan_imagenet_folder(folder)
    cached = extract_features(backbone, source, eval_transform(backbone), CPU, batch_size=8)
    assert len(source.ids) == 41 and len(cached.ids) == 39 and len(cached.skipped) == 2
    assert f"{SYNSETS[1]}/{SYNSETS[1]}_3.JPEG" in cached.skipped
    assert "skipping unreadable image" in caplog.text
