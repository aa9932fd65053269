"""The feature cache: features reproduce the model's logits; damaged caches and images are
detected, never trusted."""

import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from data import scan_imagenet_folder
from tests.conftest import SYNSETS, TINY_MODEL, write_image
from train_evaluate.inputs.backbone import (
    BackboneError,
    classifier,
    create_backbone,
    eval_transform,
)
from train_evaluate.inputs.features import (
    cache_path,
    cached_features,
    extract_features,
    load_features,
)

CPU = torch.device("cpu")
CLASSES = 1000  # test_vit's classifier


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

    first, reused = cached_features(tmp_path, "key-a", compute, CLASSES)
    assert not reused and len(calls) == 1
    second, reused = cached_features(tmp_path, "key-a", compute, CLASSES)
    assert reused and len(calls) == 1 and torch.equal(first.features, second.features)

    path = cache_path(tmp_path, "key-a")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated by a crash
    assert load_features(path, "key-a", CLASSES) is None
    assert "damaged" in caplog.text
    third, reused = cached_features(tmp_path, "key-a", compute, CLASSES)
    assert not reused and len(calls) == 2 and torch.equal(third.features, first.features)

    # a file renamed into place for another key is not trusted either
    shutil.copy(path, cache_path(tmp_path, "key-b"))
    assert load_features(cache_path(tmp_path, "key-b"), "key-b", CLASSES) is None


def test_unreadable_images_are_skipped_and_listed(backbone, image_folder, tmp_path, caplog):
    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    broken = folder / SYNSETS[1] / f"{SYNSETS[1]}_3.JPEG"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    (folder / SYNSETS[2] / "empty.jpg").write_bytes(b"")
    (folder / SYNSETS[3] / "ghost.JPEG").symlink_to(tmp_path / "moved-away.JPEG")  # dangling
    (folder / SYNSETS[4] / "album.png").mkdir()  # a folder named like an image
    source = scan_imagenet_folder(folder)
    transform = eval_transform(backbone)
    compute = lambda: extract_features(backbone, source, transform, CPU, batch_size=8)  # noqa: E731
    cached, _ = cached_features(tmp_path / "cache", "key", compute, CLASSES)
    cached, reused = cached_features(tmp_path / "cache", "key", compute, CLASSES)
    assert reused and len(source.ids) == 43 and len(cached.ids) == 39
    assert set(cached.skipped) == {
        f"{SYNSETS[1]}/{SYNSETS[1]}_3.JPEG",
        f"{SYNSETS[2]}/empty.jpg",
        f"{SYNSETS[3]}/ghost.JPEG",
        f"{SYNSETS[4]}/album.png",
    }
    assert (
        "skipping unreadable image" in caplog.text
        and "ghost.JPEG (FileNotFoundError" in caplog.text
    )


def test_a_huge_image_is_one_line_naming_it_not_pils_raw_warning(backbone, tmp_path, caplog):
    folder = tmp_path / SYNSETS[0]
    folder.mkdir()
    huge = 10_000  # 10^8 pixels, over PIL's 89.5M threshold; one colour, tiny on disk
    Image.new("P", (huge, huge), 0).save(folder / "poster.png")  # palette: quickest to decode
    write_image(folder / "small.JPEG", seed=0)
    source = scan_imagenet_folder(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cached = extract_features(backbone, source, eval_transform(backbone), CPU)
    assert cached.ids == source.ids and not cached.skipped  # decoded all the same
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    lines = [r.getMessage() for r in caplog.records if "very large" in r.getMessage()]
    assert len(lines) == 1 and f"{SYNSETS[0]}/poster.png" in lines[0] and "\n" not in lines[0]


def write_state(path: Path, model_name: str, **kwargs) -> Path:
    torch.save(timm.create_model(model_name, **kwargs).state_dict(), path)
    return path


def test_random_bytes_as_weights_are_one_clear_line(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BackboneError) as raised:
        create_backbone(TINY_MODEL, weights, CPU)
    message = str(raised.value)
    assert (
        "is not a readable state dict or checkpoint" in message or "are not a readable" in message
    )
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_a_nan_or_infinity_are_one_clear_line(tmp_path, bad):
    state = timm.create_model(TINY_MODEL).state_dict()
    key = next(k for k, v in state.items() if v.ndim == 2)
    state[key][0, 0] = bad
    weights = tmp_path / "weights.pth"
    torch.save(state, weights)
    with pytest.raises(BackboneError) as raised:
        create_backbone(TINY_MODEL, weights, CPU)
    message = str(raised.value)
    assert message == (
        f"weights {weights} hold NaN or infinite values in {key}; pass intact weights"
    ), message
    state[key][0, 0] = 0.0  # the same file intact loads
    torch.save(state, weights)
    create_backbone(TINY_MODEL, weights, CPU)


def test_weights_of_another_architecture_name_the_mismatching_keys(tmp_path):
    other = write_state(tmp_path / "efficientnet.pth", "test_efficientnet")
    with pytest.raises(BackboneError) as raised:
        create_backbone(TINY_MODEL, other, CPU)
    message = str(raised.value)
    assert message.startswith(f"weights {other} do not fit {TINY_MODEL}: missing keys cls_token,")
    assert "unexpected keys conv_stem.weight," in message and "\n" not in message

    resized = write_state(tmp_path / "ten-classes.pth", TINY_MODEL, num_classes=10)
    with pytest.raises(
        BackboneError, match=r"shape mismatch head\.weight \[10, 64\] vs \[1000, 64\]"
    ):
        create_backbone(TINY_MODEL, resized, CPU)


def test_the_device_transform_of_a_batch_equals_each_image_transformed_alone():
    """``--decode gpu``'s grouped resize (one call per image size) changes no pixel; checked
    on CPU tensors, which the same torchvision kernels handle."""
    from train_evaluate.inputs.decode import DeviceTransform

    transform = DeviceTransform(eval_transform(timm.create_model(TINY_MODEL, pretrained=False)))
    generator = torch.Generator().manual_seed(0)
    sizes = [(70, 90), (120, 64), (70, 90), (33, 47), (120, 64), (70, 90)]
    images = [torch.randint(0, 256, (3, *s), dtype=torch.uint8, generator=generator) for s in sizes]
    alone = torch.stack([transform(image) for image in images])
    together = transform.batch(images)
    assert together.shape == alone.shape and torch.equal(together, alone)


def test_work_made_ahead_in_a_thread_arrives_whole_in_order_and_errors_reach_the_consumer():
    from train_evaluate.inputs.decode import ahead

    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in ahead(failing(), depth=2):
            seen.append(item)
    assert seen == [1]
    # a consumer that stops early leaves no producer blocked behind it
    for item in ahead(iter(range(1000)), depth=1):
        if item == 3:
            break
    assert not [t for t in threading.enumerate() if t.name == "decode-ahead"]


def test_two_processes_needing_one_cache_build_it_once(tmp_path):
    """The second waits for the first's lock and reads what it wrote (threads here: each opens
    the lock file itself, as two processes do)."""
    from train_evaluate.inputs.features import CachedFeatures, cached_features

    built = []

    def compute():
        built.append(threading.get_ident())
        time.sleep(0.5)
        return CachedFeatures(torch.ones(3, 4), torch.tensor([0, 1, 2]), ("a", "b", "c"), ())

    results = []

    def need():
        results.append(cached_features(tmp_path, "k" * 64, compute, 10)[1])

    threads = [threading.Thread(target=need) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and sorted(results) == [False, True]
