"""Progress of a sweep, on a terminal or in a log file.

On a terminal, a tqdm bar. When stderr is not a terminal (nohup, a batch scheduler, a file),
tqdm stays silent, so one line per step (trial or final model) goes to the log instead, with
the elapsed time and an estimate of what is left, to the same stream: a run of hours never
looks dead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts steps of a known total; ``label`` names what is running (e.g. ``sparse r=8``)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.stream, self.total, self.done, self.label = stream, total, 0, ""
        self.started = time.perf_counter()
        self.interactive = hasattr(stream, "isatty") and stream.isatty()
        self.bar = (
            tqdm(total=total, desc="sweep", unit="run", file=stream) if (self.interactive) else None
        )

    def step(self) -> None:
        self.advance(1, self.label)

    def advance(self, count: int, what: str) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        print(
            f"progress {self.done}/{self.total} ({what}): {clock(elapsed)} elapsed, "
            f"about {clock(left)} left",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_) -> None:
        self.close()
