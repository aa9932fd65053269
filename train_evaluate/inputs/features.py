"""One pass of the frozen backbone over the images, cached on disk.

The backbone's pre-logits features are a pure function of (model, weights, preprocessing,
image), so they are computed once and every trial and final model trains on the stored
tensors. The cache file is named by a key over exactly those inputs; the split is not part of
it (features are per image; the split only chooses rows).

A file that is truncated, damaged (its SHA-256 digest over tensors and metadata no longer
matches), written for another key or holding labels the classifier cannot have is never trusted:
it is reported and rebuilt. A cache that cannot be written costs a warning, not the run. Images
that cannot be decoded are skipped, reported and listed with the features.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from data.loader import ImageDataset, image_batches
from train_evaluate.inputs.backbone import (
    BackboneError,
    classifier,
    create_backbone,
    eval_transform,
    pre_logits,
    weights_id,
)
from train_evaluate.inputs.decode import DECODES, DeviceTransform, device_batches
from train_evaluate.runtime import interrupt
from train_evaluate.runtime.files import (
    digest_matches,
    read_safetensors,
    with_digest,
    write_safetensors,
)

log = logging.getLogger(__name__)

# /2: a digest of the tensors and metadata; the key covers library versions and device.
FORMAT = "lora-compression-features/2"


@dataclass(frozen=True)
class CachedFeatures:
    """Pre-logits features of every readable image, in the source's order.

    features: N x in (float32); labels: N; ids: the N image ids; skipped: ids that could not be
    read (with the reason), excluded from every split.
    """

    features: torch.Tensor
    labels: torch.Tensor
    ids: tuple[str, ...]
    skipped: tuple[str, ...]


def feature_key(**parts: Any) -> str:
    """SHA-256 over everything that changes the features (model, weights, data, transform)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def environment(device: torch.device) -> dict[str, str]:
    """What else changes the features' last bits: the torch and timm versions (kernels and
    layers change between releases) and the kind of device (CPU and each GPU model run other
    kernels)."""
    kind = device.type
    if kind == "cuda":
        kind = f"cuda:{torch.cuda.get_device_name(device)}"
    return {"torch": torch.__version__, "timm": timm.__version__, "device": kind}


def backbone_key(
    model_name: str,
    weights: Path | None,
    source: Any,
    transform: Callable,
    device: torch.device,
    decode: str = "cpu",
) -> str:
    """The feature cache's key for this backbone, its weights, the images, the device and the
    decode mode. ``cpu`` (PIL) adds nothing, so caches written before ``--decode`` existed stay
    valid; ``gpu`` decodes and resizes with other code, so its features are keyed apart."""
    parts = dict(
        format=FORMAT,
        model=model_name,
        weights=weights_id(model_name, weights),
        data=source.fingerprint,
        transform=repr(transform),
        environment=environment(device),
    )
    if decode != "cpu":
        parts["decode"] = decode
    return feature_key(**parts)


def default_workers(device: torch.device) -> int:
    """Decoding processes for the caching pass when the user does not say.

    With a GPU, decoding is the bottleneck: up to 8 processes. On CPU the backbone already uses
    every core, and decoding processes only fight it for them (measured on 2 cores: 0.76 of the
    bare forward's speed with 2 workers, 0.9 without), so batches are decoded in threads
    between forward passes instead (0).
    """
    if device.type == "cuda":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 0


def extract_features(
    model: nn.Module,
    source: Any,
    transform: Callable,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    decode: str = "cpu",
) -> CachedFeatures:
    """Run the backbone once over every image of ``source`` (with a progress bar).

    ``decode="gpu"``: JPEGs decoded and transformed on ``device`` (CUDA only; see
    ``DeviceTransform``); ``workers`` is then unused."""
    if decode not in DECODES:
        raise ValueError(f"unknown decode mode {decode!r}; valid: {', '.join(DECODES)}")
    if decode == "gpu":
        if device.type != "cuda":
            raise ValueError("--decode gpu needs a CUDA device")
        batches = device_batches(source, DeviceTransform(transform), batch_size, device)
    else:
        batches = image_batches(
            ImageDataset(source, transform), batch_size, workers, device.type == "cuda"
        )
    model.eval()
    with torch.inference_mode():
        return collect(
            source, batches, lambda images: pre_logits(model, images.to(device)).float().cpu()
        )


def collect(
    source: Any, batches, encode: Callable[[torch.Tensor], torch.Tensor], desc: str = "features"
) -> CachedFeatures:
    """``encode`` of every readable image of ``source`` from ``batches`` ((images, indices,
    unreadable) each), with a progress bar; unreadable images are skipped and listed."""
    chunks, kept, skipped = [], [], []
    with (
        tqdm(total=len(source.ids), desc=desc, unit="img", disable=None) as bar,
        warnings.catch_warnings(),
    ):
        # Set once here, in the main thread, so decoding threads and worker processes inherit
        # it; data.loader.note_if_huge says the same in one line that names the image.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for images, indices, bad in batches:
            interrupt.check()
            for index, reason in bad:
                log.warning("skipping unreadable image %s (%s)", source.ids[index], reason)
                skipped.append(source.ids[index])
            if images is not None:
                chunks.append(encode(images))
                kept.extend(indices)
            bar.update(len(indices) + len(bad))
    if not kept:
        raise ValueError("no image could be read; check the data folder")
    labels = torch.tensor([source.labels[i] for i in kept], dtype=torch.int64)
    ids = tuple(source.ids[i] for i in kept)
    return CachedFeatures(torch.cat(chunks), labels, ids, tuple(skipped))


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"features-{key[:20]}.safetensors"


def save_features(path: Path, key: str, cached: CachedFeatures) -> None:
    """Write ``cached`` for ``key`` atomically, with a digest of its tensors and metadata."""
    metadata = {
        "format": FORMAT,
        "key": key,
        "ids": json.dumps(cached.ids),
        "skipped": json.dumps(cached.skipped),
    }
    tensors = {"features": cached.features.contiguous(), "labels": cached.labels.contiguous()}
    write_safetensors(path, tensors, with_digest(tensors, metadata))


def _read_features(path: Path, key: str, num_classes: int) -> CachedFeatures:
    """The features in ``path``; ValueError (or safetensors' and JSON's errors) if unsound."""
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        raise ValueError("it was written for other inputs")
    if not digest_matches(tensors, metadata):
        raise ValueError("its SHA-256 digest does not match its contents")
    features, labels = tensors["features"], tensors["labels"]
    ids, skipped = tuple(json.loads(metadata["ids"])), tuple(json.loads(metadata["skipped"]))
    # 2-D: pre-logits features; whole-network mode: 4-D uint8 images or a cut's float states
    if features.ndim < 2 or labels.shape != (len(ids),) or features.shape[0] != len(ids):
        raise ValueError("its tensors do not match its image list")
    if not torch.isfinite(features).all():
        raise ValueError("it holds non-finite values")
    if labels.dtype != torch.int64 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"its labels are not all in [0, {num_classes}), the classifier's classes")
    return CachedFeatures(features, labels, ids, skipped)


def load_features(path: Path, key: str, num_classes: int) -> CachedFeatures | None:
    """The cached features if ``path`` holds a sound file for ``key`` whose labels are classes
    of a ``num_classes``-way classifier; otherwise None (and a warning if the file exists)."""
    if not path.exists():
        return None
    try:
        return _read_features(path, key, num_classes)
    except Exception as error:  # safetensors, JSON, digest and shape errors all mean: rebuild
        log.warning("feature cache %s is damaged (%s); recomputing", path, error)
        return None


def cached_features(
    cache_dir: Path,
    key: str,
    compute: Callable[[], CachedFeatures],
    num_classes: int,
    what: str = "features",
) -> tuple[CachedFeatures, bool]:
    """Load the features for ``key`` from ``cache_dir``, or compute and store them.

    Returns the features and whether they came from the cache. A cache that cannot be written
    (read-only or immutable folder or file, full disk) is a warning: the run goes on uncached.
    """
    path = cache_path(cache_dir, key)
    cached = load_features(path, key, num_classes)
    if cached is not None:
        return cached, True
    with building(path):
        # another process (a worker) may have built it while this one waited for the lock
        cached = load_features(path, key, num_classes)
        if cached is not None:
            return cached, True
        cached = compute()
        try:
            save_features(path, key, cached)
        except OSError as error:
            log.warning("%s: cannot write the cache %s (%s); going on uncached", what, path, error)
        else:
            log.info("%s: cached in %s", what, path)
    return cached, False


@contextlib.contextmanager
def building(path: Path):
    """Hold ``<path>.lock`` while ``path`` is built: processes that need the same cache at once
    build it once, the others wait and read it. No lock where the folder cannot be written (the
    cache is then not written either)."""
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@dataclass
class BackboneFeatures:
    model: nn.Module
    key: str
    cached: CachedFeatures
    reused: bool


def check_labels(source: Any, num_classes: int, model_name: str) -> None:
    """The data's labels must be classes of the model's classifier (before any pass over it)."""
    top = max(source.labels)
    if min(source.labels) < 0 or top >= num_classes:
        raise BackboneError(
            f"the data has labels up to {top} but {model_name}'s classifier has {num_classes} "
            "classes; use a model trained on the data's classes (ImageNet folders: 1000)"
        )


def backbone_features(
    model_name: str,
    weights: Path | None,
    source: Any,
    device: torch.device,
    cache_dir: Path,
    batch_size: int = 64,
    workers: int = 0,
    model: nn.Module | None = None,
    decode: str = "cpu",
) -> BackboneFeatures:
    """The frozen backbone and the pre-logits features of every image of ``source``, from the
    cache when they are there (logged either way). Raises BackboneError for unusable weights or
    labels the model's classifier does not have. ``model``: the backbone already loaded from
    ``weights`` (it is not loaded twice)."""
    model = model if model is not None else create_backbone(model_name, weights, device)
    num_classes = classifier(model).out_features
    check_labels(source, num_classes, model_name)
    transform = eval_transform(model)
    key = backbone_key(model_name, weights, source, transform, device, decode)

    def compute() -> CachedFeatures:
        started = time.perf_counter()
        cached = extract_features(model, source, transform, device, batch_size, workers, decode)
        log.info(
            "features: computed for %d images in %.1f s",
            len(cached.ids),
            time.perf_counter() - started,
        )
        return cached

    cached, reused = cached_features(cache_dir, key, compute, num_classes)
    if reused:
        log.info(
            "features: reusing the feature cache (%d images) in %s", len(cached.ids), cache_dir
        )
    if cached.skipped:
        log.warning("%d unreadable images were skipped", len(cached.skipped))
    return BackboneFeatures(model, key, cached, reused)
