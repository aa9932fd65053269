"""The images of a whole-network run, decoded once: cached as uint8 at the model's input size
(``ImageModel`` scales and normalises them exactly as timm's eval transform does) and, when a
block boundary precedes every selected layer, the boundary's output (the state) cached once
as well, so that every step runs the network from there on (``StateModel``;
``lora.cut`` finds and verifies the boundary).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from train_evaluate.inputs.selection import SelectionError

log = logging.getLogger(__name__)

IMAGES_FORMAT = "lora-compression-images/1"
EVAL_CHUNK = 256  # images per forward pass when a whole network is evaluated


def uint8_transform(transform: T.Compose) -> T.Compose:
    """timm's eval transform up to the crop, ending in uint8 pixels instead of normalised floats.

    The float transform is ``... crop, ToTensor (x / 255), Normalize``; ``ImageModel`` applies
    the last two to the stored pixels with the same operations, so nothing is lost by storing
    uint8 (ToTensor itself divides the uint8 pixels by 255).
    """
    steps = list(transform.transforms)
    kinds = [type(step).__name__ for step in steps[-2:]]
    if kinds[-1] != "Normalize" or "ToTensor" not in kinds[0]:
        raise SelectionError(f"unexpected preprocessing {kinds}: cannot cache uint8 images")
    return T.Compose([*steps[:-2], T.PILToTensor()])


def normalisation(transform: T.Compose) -> tuple[tuple[float, ...], tuple[float, ...]]:
    last = transform.transforms[-1]
    return tuple(float(v) for v in last.mean), tuple(float(v) for v in last.std)


def precision(inputs: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (mixed precision: parameters, gradients and optimizer state stay
    fp32); on CPU everything is fp32."""
    if inputs.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageModel(nn.Module):
    """A classifier that takes cached uint8 images: x / 255, normalised, then the model."""

    eval_chunk = EVAL_CHUNK

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        # the same two operations, in the same order, as ToTensor and Normalize
        return images.float().div(255).sub(self.mean).div(self.std)

    def forward(self, images: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        with precision(images):
            return self.model(self.preprocess(images)).float()

    def wrap(self, model: nn.Module) -> ImageModel:
        """``model`` (this one's network with other layers) taking the same inputs as this."""
        return ImageModel(model, self.mean.flatten().tolist(), self.std.flatten().tolist())


class StateModel(ImageModel):
    """The network from a cache cut on (``lora.cut``): it takes the cached state,
    the
    float32 output of a block boundary (``state_shape`` per image), which needs no scaling; the
    modules before the boundary are skipped."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        state_shape: Sequence[int],
    ) -> None:
        super().__init__(model, mean, std)
        self.state_shape = tuple(state_shape)

    def preprocess(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def wrap(self, model: nn.Module) -> StateModel:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return StateModel(model, mean, std, self.state_shape)


def image_bytes(count: int, input_size: Sequence[int]) -> int:
    return count * math.prod(input_size)


def images_key(source: Any, transform: T.Compose) -> str:
    """The image cache's key: the data and the uint8 transform (no model, no device: the
    pixels do not depend on them)."""
    from train_evaluate.inputs.features import feature_key

    return feature_key(format=IMAGES_FORMAT, data=source.fingerprint, transform=repr(transform))


def decode_images(source: Any, transform: T.Compose, batch_size: int, workers: int):
    """Every readable image of ``source`` as uint8 (N x C x H x W), with a progress bar."""
    from data.loader import ImageDataset, image_batches
    from train_evaluate.inputs.features import collect

    batches = image_batches(ImageDataset(source, transform), batch_size, workers, False)
    return collect(source, batches, lambda images: images, "images")


def cached_images(
    source: Any,
    transform: T.Compose,
    cache_dir,
    num_classes: int,
    batch_size: int = 64,
    workers: int = 0,
):
    """The decoded images of ``source`` from the cache, or decoded now and cached; returns the
    CachedFeatures (``features`` holds the uint8 images), the key and whether it was reused."""
    from train_evaluate.inputs.features import cached_features

    key = images_key(source, transform)

    def compute():
        started = time.perf_counter()
        cached = decode_images(source, transform, batch_size, workers)
        log.info(
            "images: decoded %d images in %.1f s", len(cached.ids), time.perf_counter() - started
        )
        return cached

    cached, reused = cached_features(cache_dir, key, compute, num_classes, "images")
    if reused:
        log.info("images: reusing the image cache (%d images) in %s", len(cached.ids), cache_dir)
    return cached, key, reused


def example_inputs(model: ImageModel, input_size: Sequence[int], count: int) -> torch.Tensor:
    """``count`` random inputs of what ``model`` takes: uint8 images, or float32 states."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(model, StateModel):
        return torch.randn((count, *model.state_shape), generator=generator)
    return torch.randint(0, 256, (count, *input_size), dtype=torch.uint8, generator=generator)


def cached_states(
    images: Any,
    model: ImageModel,
    cut: Any,
    cache_dir,
    key: str,
    num_classes: int,
    batch_size: int = 64,
):
    """The state at ``cut`` of every cached image (``images``: the image cache's
    CachedFeatures), from the cache under ``key`` or computed now by ``model``'s prefix alone
    (uncompressed, on its device) and cached; returns the CachedFeatures and whether they were
    reused. Same images, labels and ids as ``images``."""
    from tqdm import tqdm

    from lora.cut import state_of
    from train_evaluate.inputs.features import CachedFeatures, cached_features
    from train_evaluate.runtime import interrupt

    device = next(model.parameters()).device

    def compute():
        started = time.perf_counter()
        chunks = []
        with tqdm(total=len(images.ids), desc="states", unit="img", disable=None) as bar:
            for chunk in images.features.split(batch_size):
                interrupt.check()
                batch = model.preprocess(chunk.to(device))
                with torch.no_grad(), precision(batch):
                    chunks.append(state_of(model.model, cut.module, batch).cpu())
                bar.update(len(chunk))
        log.info(
            "states: %d images through the prefix up to %s in %.1f s",
            len(images.ids),
            cut.module,
            time.perf_counter() - started,
        )
        return CachedFeatures(torch.cat(chunks), images.labels, images.ids, images.skipped)

    cached, reused = cached_features(cache_dir, key, compute, num_classes, "states")
    if reused:
        log.info("states: reusing the cache of %s's output in %s", cut.module, cache_dir)
    return cached, reused


def epoch_seconds(model: ImageModel, example: torch.Tensor, images: int) -> float:
    """A rough cost of one training epoch over ``images``: one timed forward and backward pass
    of ``example`` (a small batch of the model's inputs) from the cache on, scaled. Printed
    before any work."""
    device = next(model.parameters()).device
    probe = copy.deepcopy(model).eval()
    inputs = probe.preprocess(example.to(device)).float().requires_grad_(True)
    started = time.perf_counter()
    probe.model(inputs).sum().backward()
    return (time.perf_counter() - started) / len(example) * images


# --calib-augment: the share of each image's area and the aspect ratio a view's crop takes (as
# a training pipeline's random resized crop, narrowed: the images are already centre crops)
VIEW_SCALE = (0.25, 1.0)
VIEW_RATIO = (3 / 4, 4 / 3)


def calibration_views(images: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """``views`` views of each uint8 image (N x C x H x W -> N*views x C x H x W): the image
    itself, then ``views - 1`` random resized crops (``VIEW_SCALE`` of its area, aspect in
    ``VIEW_RATIO``, resized back to H x W with antialiasing), each flipped left-right with
    probability 1/2. Seeded: the same images and seed give the same views. It sees the pixels
    it is given and nothing else (no label)."""
    from torchvision.transforms.v2 import functional as TF

    if views == 1:
        return images
    generator = torch.Generator().manual_seed(seed)
    height, width = images.shape[-2:]

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def crop(image: torch.Tensor) -> torch.Tensor:
        area = height * width * uniform(*VIEW_SCALE)
        aspect = math.exp(uniform(math.log(VIEW_RATIO[0]), math.log(VIEW_RATIO[1])))
        h = min(height, max(1, round(math.sqrt(area / aspect))))
        w = min(width, max(1, round(math.sqrt(area * aspect))))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        view = TF.resized_crop(image, top, left, h, w, [height, width], antialias=True)
        return view.flip(-1) if uniform(0, 1) < 0.5 else view

    # all the images first, then each further view of every image in turn
    extra = [torch.stack([crop(image) for image in images]) for _ in range(views - 1)]
    return torch.cat([images, *extra])
