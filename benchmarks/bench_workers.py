"""Wall time of the offline demo's sweep with one worker against two (``--workers 2``), in one
run, as a ratio.

    python -m benchmarks.bench_workers [--ranks 2 4 6 8] [--trials 10] [--epochs 10]
        [--repeats 5]

Each repetition runs the driver as a fresh process, into a fresh run folder, with the default
storage (the run folder's SQLite file); the feature cache and the demo classifier are built
once, before timing. The variants alternate (one worker, two workers, one, two...), each
figure is the median of ``--repeats`` repetitions with its min and max, and the ratio is taken
pair by pair. Each worker is given one thread (``--threads 1``), so two workers use two cores
where one uses one: on a machine of 2 cores this is the most two workers can gain.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPEATS, interleaved, machine, ratio_line

DRIVER = Path(__file__).resolve().parents[1] / "train_evaluate" / "train_model.py"


def sweep(args: argparse.Namespace, scratch: Path, workers: int, run: list[int]) -> None:
    run[0] += 1
    command = [
        sys.executable, str(DRIVER), "--init", "svd_init", "--ranks", *map(str, args.ranks),
        "--trials", str(args.trials), "--epochs", str(args.epochs), "--threads", "1",
        "--workers", str(workers), "--cache-dir", str(scratch / "cache"),
        "--out", str(scratch / f"run-{run[0]}"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the driver failed ({done.returncode}):\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 6, 8])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        scratch, run = Path(folder), [0]
        print(
            f"{machine()}; the demo, --ranks {' '.join(map(str, args.ranks))}, --trials "
            f"{args.trials}, --epochs {args.epochs}, 2 methods, 1 thread per worker"
        )
        timings = interleaved(
            {
                "one worker": lambda: sweep(args, scratch, 1, run),
                "two workers": lambda: sweep(args, scratch, 2, run),
            },
            args.repeats,
        )
    for timing in timings.values():
        print(timing.line())
    print(ratio_line(timings["one worker"], timings["two workers"], "speedup of two workers"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
