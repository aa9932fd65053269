"""Timing helpers shared by the benchmark scripts.

``synthetic_features`` (ImageNet-shaped cached features and a random classifier) lives in the
product, ``train_evaluate/training/synthetic.py``, so that tests use it without importing
benchmarks; it
is re-exported here for the scripts.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train_evaluate.training.synthetic import synthetic_features

__all__ = [
    "Timing",
    "finished_runs",
    "image_folder",
    "interleaved",
    "machine",
    "ratio_line",
    "seconds_per_call",
    "synthetic_features",
]


def finished_runs(results: Path) -> list[Path]:
    """The evaluation.csv of each finished driver run under ``results`` (a ``--results-dir``:
    model / data / run folder), the last file a run writes."""
    return sorted(results.glob("*/*/*/evaluation.csv"))


REPEATS = 5  # every figure is the median of at least this many interleaved repetitions


@dataclass(frozen=True)
class Timing:
    """Wall seconds of each repetition of one variant."""

    name: str
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def line(self, scale: float = 1.0, unit: str = "s") -> str:
        """median [min, max] over n repetitions, and the thread count, e.g. for 1 / seconds."""
        values = sorted(scale * s for s in self.seconds)
        return (
            f"{self.name}: median {statistics.median(values):.4g} {unit} "
            f"[min {values[0]:.4g}, max {values[-1]:.4g}] over {len(values)} interleaved "
            f"repetitions, {torch.get_num_threads()} threads"
        )


def _synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int = REPEATS, warmup: bool = True
) -> dict[str, Timing]:
    """Time each variant ``repeats`` times in turn (A, B, A, B, ...), so a busy moment of a
    shared machine hits every variant alike instead of one; an untimed warm-up call each first
    (one-off costs: allocation, kernel selection, graph capture)."""
    if repeats < 1:
        raise ValueError(f"at least one repetition; got {repeats} (figures use {REPEATS})")
    if warmup:
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _synchronise()
            started = time.perf_counter()
            fn()
            _synchronise()
            times[name].append(time.perf_counter() - started)
            # as it goes, so a run cut short by a timeout still shows what it measured
            print(f"  {name}, repetition {len(times[name])}: {times[name][-1]:.4g} s", flush=True)
    return {name: Timing(name, tuple(values)) for name, values in times.items()}


def ratio_line(slow: Timing, fast: Timing, what: str = "speedup") -> str:
    """slow / fast per repetition pair (each measured back to back), median [min, max]."""
    ratios = sorted(a / b for a, b in zip(slow.seconds, fast.seconds, strict=True))
    return (
        f"{what} ({slow.name} / {fast.name}): median {statistics.median(ratios):.2f}x "
        f"[min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x] over {len(ratios)} interleaved pairs, "
        f"{torch.get_num_threads()} threads"
    )


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


def missing_inputs(paths: dict[str, Path]) -> int:
    """0 when every path exists; else 2, after one line on stderr naming the first missing
    one (``paths``: what it is -> where)."""
    for what, path in paths.items():
        if not path.exists():
            print(f"error: {what} {path} is missing (see the module doc)", file=sys.stderr)
            return 2
    return 0
