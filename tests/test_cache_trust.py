"""What is read back from the caches is checked, what cannot be written costs a warning, and
temporaries of killed writers are cleaned up: damaged feature caches and demo weights are
rebuilt, never trusted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data import load_digits_source, scan_imagenet_folder
from tests.conftest import REPO, TINY_MODEL
from train_evaluate.inputs.backbone import BackboneError, eval_transform
from train_evaluate.inputs.demo import DEMO_MODEL, DemoRecipe, demo_weights
from train_evaluate.inputs.features import (
    CachedFeatures,
    backbone_features,
    backbone_key,
    cache_path,
    cached_features,
    load_features,
    save_features,
)
from train_evaluate.runtime.files import (
    HOST,
    atomic_path,
    read_safetensors,
    remove_orphan_temporaries,
)

CLASSES = 10
KEY = "key-a"


def sample_features(seed: int = 0, count: int = 12) -> CachedFeatures:
    generator = torch.Generator().manual_seed(seed)
    return CachedFeatures(
        features=torch.randn(count, 8, generator=generator),
        labels=torch.randint(0, CLASSES, (count,), generator=generator),
        ids=tuple(f"img{i}" for i in range(count)),
        skipped=("broken.jpg",),
    )


def flip_bit(path: Path, tensor: str, byte: int, bit: int = 0) -> None:
    """Flip one bit of one byte of ``tensor``'s data in a safetensors file, in place."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header_size])[tensor]["data_offsets"][0]
    data[8 + header_size + start + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Rewrite the file with the same tensors and digest but changed metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = {**(handle.metadata() or {}), **changes}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)


def saved(tmp_path: Path) -> tuple[CachedFeatures, Path]:
    cached = sample_features()
    path = cache_path(tmp_path, KEY)
    save_features(path, KEY, cached)
    assert load_features(path, KEY, CLASSES) is not None  # sound before the damage
    return cached, path


def test_a_flipped_bit_in_finite_features_is_caught_and_the_cache_rebuilt(tmp_path, caplog):
    cached, path = saved(tmp_path)
    flip_bit(path, "features", byte=4 * 5)  # lowest mantissa bit of row 0, col 5: still finite
    assert load_features(path, KEY, CLASSES) is None
    assert "digest does not match" in caplog.text
    calls = []

    def compute() -> CachedFeatures:
        calls.append(1)
        return cached

    again, reused = cached_features(tmp_path, KEY, compute, CLASSES)
    assert not reused and calls == [1] and torch.equal(again.features, cached.features)
    assert cached_features(tmp_path, KEY, compute, CLASSES)[1]  # the rebuilt file is sound


def test_shifted_labels_are_caught(tmp_path, caplog):
    _, path = saved(tmp_path)
    flip_bit(path, "labels", byte=8 * 3)  # label 3 becomes its neighbour 2k <-> 2k+1: in range
    assert load_features(path, KEY, CLASSES) is None
    assert "digest does not match" in caplog.text


@pytest.mark.parametrize(
    "changes",
    [{"ids": json.dumps([f"img{i}" for i in reversed(range(12))])}, {"skipped": "[]"}],
    ids=["ids reordered", "skipped list emptied"],
)
def test_altered_metadata_is_caught(tmp_path, caplog, changes):
    _, path = saved(tmp_path)
    rewrite_metadata(path, **changes)
    assert load_features(path, KEY, CLASSES) is None
    assert "digest does not match" in caplog.text


def test_labels_outside_the_classifier_are_rejected_not_a_traceback(tmp_path, caplog):
    cached = sample_features()
    labels = cached.labels.clone()
    labels[3] = CLASSES  # a sound file (digest intact) for a classifier with more classes
    path = cache_path(tmp_path, KEY)
    save_features(path, KEY, CachedFeatures(cached.features, labels, cached.ids, cached.skipped))
    assert load_features(path, KEY, CLASSES + 1) is not None
    assert load_features(path, KEY, CLASSES) is None
    assert f"labels are not all in [0, {CLASSES})" in caplog.text
    again, reused = cached_features(tmp_path, KEY, lambda: cached, CLASSES)
    assert not reused and torch.equal(again.labels, cached.labels)


def test_data_with_labels_the_model_lacks_is_one_clear_error(image_folder, tmp_path):
    # digits_vit has 10 classes; the ImageNet folder's labels go up to 999.
    weights = tmp_path / "digits_vit.safetensors"
    save_file(timm.create_model(DEMO_MODEL).state_dict(), str(weights))
    source = scan_imagenet_folder(image_folder)
    with pytest.raises(BackboneError, match="labels up to 999 but digits_vit's classifier has 10"):
        backbone_features(DEMO_MODEL, weights, source, torch.device("cpu"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any pass over the images


def test_the_key_covers_torch_timm_and_the_device(tiny_weights, image_folder, monkeypatch):
    source = scan_imagenet_folder(image_folder)
    transform = eval_transform(timm.create_model(TINY_MODEL))
    cpu = torch.device("cpu")

    def key(device: torch.device = cpu) -> str:
        return backbone_key(TINY_MODEL, tiny_weights, source, transform, device)

    reference = key()
    assert key() == reference
    assert key(torch.device("meta")) != reference
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert key() != reference
    monkeypatch.undo()
    monkeypatch.setattr(timm, "__version__", "0.0.0-other")
    assert key() != reference


def unwritable(tmp_path: Path) -> Path:
    """A cache folder that cannot be created, even by root: its parent is a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    return blocker / "cache"


def test_an_unwritable_feature_cache_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    cached = sample_features()
    result, reused = cached_features(unwritable(tmp_path), KEY, lambda: cached, CLASSES)
    assert not reused and torch.equal(result.features, cached.features)
    warnings = [r for r in caplog.records if "cannot write the cache" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


TINY_RECIPE = DemoRecipe(epochs=1, batch_size=32)


def test_demo_weights_are_checked_on_reuse_and_retrained_when_altered(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source = load_digits_source()
    train = torch.arange(64)
    path = demo_weights(tmp_path, source, train, seed=0, recipe=TINY_RECIPE)
    original = {k: v.clone() for k, v in load_file(str(path)).items()}  # not the mapped file
    assert demo_weights(tmp_path, source, train, seed=0, recipe=TINY_RECIPE) == path
    assert "demo classifier: reusing" in caplog.text
    caplog.clear()
    flip_bit(path, "head.weight", byte=0)
    again = demo_weights(tmp_path, source, train, seed=0, recipe=TINY_RECIPE)
    assert "digest does not match" in caplog.text and "training it again" in caplog.text
    rebuilt = load_file(str(again))  # seeded: the same weights again
    assert again == path and all(torch.equal(rebuilt[k], v) for k, v in original.items())


def test_demo_weights_that_cannot_be_cached_go_to_a_temporary_file(tmp_path, caplog):
    source = load_digits_source()
    path = demo_weights(unwritable(tmp_path), source, torch.arange(64), 0, TINY_RECIPE)
    assert path.is_file() and "using a temporary copy for this run only" in caplog.text
    timm.create_model(DEMO_MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)})


def dead_writers_temporary(folder: Path) -> Path:
    """A temporary left by a writer that really died inside ``atomic_path`` (no cleanup)."""
    script = (
        "import os, sys; from pathlib import Path\n"
        "from train_evaluate.runtime.files import atomic_path\n"
        "context = atomic_path(Path(sys.argv[1]) / 'features.safetensors')\n"
        "print(context.__enter__(), flush=True); os._exit(0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip())  # run() has waited: this PID is dead


def test_orphan_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    nested = tmp_path / "cache" / "deeper"
    orphan = dead_writers_temporary(nested)
    assert orphan.is_file() and f"{HOST}-" in orphan.name
    dead = orphan.name.split(f"{HOST}-")[1].split(".")[0]
    foreign = nested / f".features.{'0' * 8}-{dead}.abcdefgh.tmp.safetensors"  # another host's
    foreign.write_text("")
    unrelated = nested / ".notes.tmp.txt"
    unrelated.write_text("")
    with atomic_path(tmp_path / "run.json") as ours:  # this process: alive
        ours.write_text("{}")
        assert remove_orphan_temporaries(tmp_path) == 1
        assert not orphan.exists() and ours.exists() and foreign.exists() and unrelated.exists()
    assert (tmp_path / "run.json").read_text() == "{}"
    assert remove_orphan_temporaries(tmp_path) == 0
    assert remove_orphan_temporaries(tmp_path / "missing") == 0


def test_tensors_read_back_are_aligned_whatever_the_header_length(tmp_path):
    """A cache's header holds our metadata, so its length varies; what is read back must not
    sit at the header's offset: products of misaligned operands sum in another order, and a
    run's numbers would then depend on how long its cache's header is."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(96, 40, generator=generator)
    weight = torch.randn(10, 40, generator=generator)
    expected = features @ weight.T
    offsets = set()
    for length in range(64):  # every header length modulo 64
        path = tmp_path / f"{length}.safetensors"
        save_file({"features": features}, str(path), metadata={"pad": "x" * length})
        with safe_open(str(path), framework="pt") as handle:  # where safetensors puts it
            offsets.add(handle.get_tensor("features").data_ptr() % 64)
        metadata, tensors = read_safetensors(path)
        assert metadata["pad"] == "x" * length
        assert tensors["features"].data_ptr() % 64 == 0
        assert torch.equal(tensors["features"] @ weight.T, expected)
    assert len(offsets) > 1  # the headers did move the tensor's offset in the file


ALIGNMENT_PROBE = """
import train_evaluate  # before torch's first product: its MKL setting must take effect
import torch

generator = torch.Generator().manual_seed(0)
a, b = torch.randn(64, 512, generator=generator), torch.randn(10, 512, generator=generator)
expected = a @ b.T
moved = 0
for offset in range(1, 16):
    buffer = torch.empty(a.numel() + offset)
    shifted = buffer[offset:].view_as(a)
    shifted.copy_(a)
    moved += not torch.equal(shifted @ b.T, expected)
print(moved)
"""


@pytest.mark.parametrize("user_value", [None, "COMPATIBLE"])
def test_importing_the_package_makes_products_independent_of_alignment(user_value):
    """A process of this tool asks MKL for reproducible products: an operand's offset in
    memory changes no bit of a product; a user's own MKL_CBWR is left as it is."""
    environment = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if user_value is not None:
        environment["MKL_CBWR"] = user_value
    probe = ALIGNMENT_PROBE + "import os; print(os.environ.get('MKL_CBWR', '-'))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=environment, capture_output=True,
        text=True, check=True, timeout=120,
    )  # fmt: skip
    moved, setting = done.stdout.split()
    if user_value is None:
        assert moved == "0", f"{moved} of 15 shifted operands changed the product"
    assert setting == (user_value or "AUTO,STRICT")
