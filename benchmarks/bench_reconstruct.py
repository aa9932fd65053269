"""How long ``--reconstruct block`` takes on EfficientNet-Lite0 with 512 calibration views,
calibration included (the project's target: 15 minutes on 2 CPU cores).

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    python -m benchmarks.bench_reconstruct [--calib-images 64] [--calib-augment 8] [--rank 16]

It runs the driver once, ``--layers all --epochs 0 --init act_svd_init --methods int2
--int-scale mse --reconstruct block``, ``--calib-augment`` views of each of ``--calib-images``
images (64 x 8 = 512 views by default), on a folder of images (the 200 of
../shared/imagenet-sample repeated as needed, or generated JPEGs without them; the split
80/10/10), and prints the seconds of the sequential calibration, of the reconstruction and of
the whole run (decoding the images, the original's and the compressed model's evaluation
included), read off the run's own log lines. A timing, not an accuracy.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import image_folder, machine, missing_inputs
from train_evaluate.train_model import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
PHASES = {
    "calibration": re.compile(r"compressed and initialised .* in ([0-9.]+) s"),
    "reconstruction": re.compile(r"blocks reconstructed .* in ([0-9.]+) s"),
}


class Phases(logging.Handler):
    """Collects the seconds the driver logs for each phase."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for phase, pattern in PHASES.items():
            if found := pattern.search(message):
                self.seconds[phase] = self.seconds.get(phase, 0.0) + float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--calib-augment", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="--reconstruct-steps")
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the weights": args.weights}):
        return missing
    phases = Phases()
    logging.getLogger("train_evaluate").addHandler(phases)
    with tempfile.TemporaryDirectory() as scratch:
        count = round(args.calib_images / 0.8)
        folder, what = image_folder(count, Path(scratch) / "images")
        started = time.perf_counter()
        code = train_main(
            [
                "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(folder),
                "--layers", "all", "--epochs", "0", "--init", "act_svd_init",
                "--methods", "int2", "--int-scale", "mse", "--ranks", str(args.rank),
                "--split", "0.8", "0.1", "0.1", "--calib-images", str(args.calib_images),
                "--calib-augment", str(args.calib_augment),
                "--reconstruct", "block", "--reconstruct-steps", str(args.steps),
                "--results-dir", str(Path(scratch) / "results"),
            ]
        )  # fmt: skip
        total = time.perf_counter() - started
    if code != 0:
        print(f"error: the driver failed (exit {code})", file=sys.stderr)
        return code
    views = args.calib_images * args.calib_augment
    print(f"EfficientNet-Lite0, --layers all, rank {args.rank}, {views} calibration views "
          f"({args.calib_images} images x {args.calib_augment}; {what}), {args.steps} steps "
          f"per block; {machine()}")  # fmt: skip
    for phase in PHASES:
        print(f"{phase}: {phases.seconds.get(phase, float('nan')):.0f} s")
    verdict = "within" if total <= 15 * 60 else f"over, by {total / 60 - 15:.1f} min"
    print(f"whole run: {total:.0f} s ({total / 60:.1f} min): {verdict} the 15-minute target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
