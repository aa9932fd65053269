"""Timing helpers shared by the benchmark scripts.

``synthetic_features`` (ImageNet-shaped cached features and a random classifier) lives in the
product, ``train_evaluate/synthetic.py``, so that tests use it without importing benchmarks; it
is re-exported here for the scripts.
"""

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

from train_evaluate.synthetic import synthetic_features

__all__ = ["image_folder", "machine", "seconds_per_call", "synthetic_features"]


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
