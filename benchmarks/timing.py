"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


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
