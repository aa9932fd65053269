"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def seconds_per_call(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    """Median seconds of one call of ``fn``.

    Calls run in blocks sized to take about 20 ms each, after a warm-up block, until
    ``min_run_time`` has passed; the median block gives the time (robust to a busy moment on a
    shared machine). On a GPU each block ends with a synchronisation.
    """
    synchronise = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def block(calls: int) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronise()
        return (time.perf_counter() - started) / calls

    once = block(1)  # warm-up, and a first estimate
    calls = max(1, int(0.02 / max(once, 1e-9)))
    times, deadline = [], time.perf_counter() + min_run_time
    while time.perf_counter() < deadline or len(times) < 3:
        times.append(block(calls))
    return statistics.median(times)


def machine() -> str:
    """One line naming where the figures were measured."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    return f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads"


SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "imagenet-sample"


def image_folder(count: int, scratch: Path) -> tuple[Path, str]:
    """A folder of ``count`` ImageNet-like JPEGs in synset folders, and what they are.

    The 200 real images of ../shared/imagenet-sample are used when present (repeated to reach
    ``count``); otherwise smooth random 500 x 375 pictures, saved as JPEG at quality 90, which
    decode at about the cost of photographs of that size.
    """
    from data import imagenet_synsets

    synsets = imagenet_synsets()
    real = sorted(SAMPLE.glob("*/*.JPEG")) if SAMPLE.is_dir() else []
    generator = np.random.default_rng(0)
    for index in range(count):
        folder = scratch / synsets[index % len(synsets)]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"image_{index:05d}.JPEG"
        if real:
            shutil.copyfile(real[index % len(real)], target)
        else:
            coarse = generator.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            picture = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
            picture.save(target, quality=90)
    what = "real ImageNet sample images" if real else "synthetic 500x375 JPEGs"
    return scratch, f"{count} {what}"


def synthetic_features(
    train: int, val: int, in_features: int = 512, classes: int = 1000, seed: int = 0
):
    """ImageNet-shaped cached features, a random classifier of the matching shape, and the
    train / val / test splits the sweep uses.

    The features are random (the cost of a step does not depend on them) and the labels are
    the classifier's own predictions, so that compression costs accuracy and adapters win it
    back, and Optuna's pruner sees trials that differ as on real data.
    """
    from torch import nn

    from train_evaluate.sweep import Splits
    from train_evaluate.training import FeatureSplit

    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(in_features, classes).requires_grad_(False)
    with torch.no_grad():  # from the seed, not from torch's global generator
        head.weight.copy_(torch.randn(classes, in_features, generator=generator) / in_features**0.5)
        head.bias.copy_(0.1 * torch.randn(classes, generator=generator))

    def split(rows: int) -> FeatureSplit:
        features = torch.randn(rows, in_features, generator=generator).relu()
        return FeatureSplit(features, head(features).argmax(dim=1))

    return head, Splits(split(train), split(val), split(max(val // 4, 1)))
