"""Does reconstruction below 4 bits want more steps? EfficientNet-Lite0 under one bit budget,
training-free, with block reconstruction and learned rounding at growing steps per block.

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    python -m benchmarks.reconstruct_steps [--steps 100 2000 20000] [--time-limit SECONDS]

Each step count runs the driver once: ``--layers all --epochs 0 --init act_svd_init --methods
int2 int4 --int-scale mse --ranks 2 4 8 16 --adapter-dtype fp16 --split 0.4 0.1 0.5
--calib-images 80 --bits-budget 3 --budget-sensitivity kl --budget-only --reconstruct block
--quantizer adaround --reconstruct-steps N`` on ``../shared/imagenet-sample`` (80 calibration
images, 100 test images: one image is one point). It prints one row per step count as soon as
it has it: test top-1 of the compressed model alone and with its reconstructed adapters, the
selected layers' bits per weight (what the budget bounds) and the whole model's
(``model_bits_per_weight``), the blocks' mean relative error before and after, the seconds the
reconstruction took and the whole run's.

``--time-limit``: the seconds all the runs may take together. Each run after the first is
priced from the ones before (their fixed part, and seconds per reconstruction step: the
last run's reconstruction seconds over its steps, an upper bound, or the slope between the
last two); a step
count that would not fit is replaced by the largest multiple of 100 that does, and the line
says so; none is run once even that is no larger than the last count run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmarks.bench_reconstruct import Phases
from benchmarks.common import finished_runs, machine, missing_inputs
from train_evaluate.train_model import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
MARGIN = 1.15  # a run is started only if 1.15 x its predicted seconds fit in what is left


@dataclass(frozen=True)
class Measured:
    steps: int
    seconds: float  # the whole run
    reconstruction: float  # of which the reconstruction

    @property
    def per_step(self) -> float:
        return self.reconstruction / self.steps

    @property
    def fixed(self) -> float:
        return self.seconds - self.reconstruction


def driver_options(args: argparse.Namespace, steps: int, results: Path) -> list[str]:
    return [
        "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(args.data_dir),
        "--layers", "all", "--epochs", "0", "--init", "act_svd_init",
        "--methods", *args.methods, "--int-scale", "mse", "--ranks", *map(str, args.ranks),
        "--adapter-dtype", "fp16", "--split", "0.4", "0.1", "0.5",
        "--calib-images", str(args.calib_images),
        "--bits-budget", f"{args.bits_budget:g}", "--budget-sensitivity", "kl", "--budget-only",
        "--reconstruct", "block", "--quantizer", "adaround", "--reconstruct-steps", str(steps),
        "--results-dir", str(results / f"steps{steps}"), "--cache-dir", str(results / "cache"),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip


def affordable(wanted: int, done: list[Measured], left: float) -> tuple[int, float]:
    """The step count to run next (``wanted``, or the largest multiple of 100 that fits in
    ``left`` seconds as the runs so far price it) and its predicted seconds."""
    if not done:
        return wanted, float("nan")
    fixed, per_step = max(m.fixed for m in done), done[-1].per_step
    if len(done) > 1:  # the reconstruction's own fixed part (its captures) from the last two
        a, b = done[-2], done[-1]
        per_step = max((b.reconstruction - a.reconstruction) / (b.steps - a.steps), 1e-9)
        fixed += max(b.reconstruction - per_step * b.steps, 0.0)

    def predicted(steps: int) -> float:
        return fixed + per_step * steps

    if MARGIN * predicted(wanted) <= left:
        return wanted, predicted(wanted)
    fits = int((left / MARGIN - fixed) / per_step) // 100 * 100
    return fits, predicted(fits)


def one_run(args: argparse.Namespace, steps: int, scratch: Path) -> tuple[dict, Measured]:
    phases = Phases()
    logger = logging.getLogger("train_evaluate")
    logger.addHandler(phases)
    started = time.perf_counter()
    try:
        code = train_main(driver_options(args, steps, scratch))
    finally:
        logger.removeHandler(phases)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"error: the driver failed at {steps} steps per block (exit {code})")
    (folder,) = finished_runs(scratch / f"steps{steps}")
    rows = pd.read_csv(folder)
    layers = pd.read_csv(folder.parent / "layers.csv")
    ranked = rows[rows["lora_rank"].astype(str).str.isdigit()]
    (adapted,) = [r for _, r in ranked.iterrows()]
    (compressed,) = [r for _, r in rows[rows["lora_rank"] == "quantized"].iterrows()]
    (original,) = [r for _, r in rows[rows["lora_rank"] == "original"].iterrows()]
    blocks = layers.drop_duplicates("block")
    reconstruction = phases.seconds.get("reconstruction")
    if reconstruction is None:
        raise SystemExit(f"error: the driver logged no reconstruction time at {steps} steps per "
                         "block; the next step counts cannot be priced")  # fmt: skip
    row = {
        "steps": steps,
        "original": original["evaluation"],
        "compressed": compressed["evaluation"],
        "top1": adapted["evaluation"],
        "bits_per_weight": adapted["bits_per_weight"],
        "model_bits_per_weight": adapted["model_bits_per_weight"],
        "error_start": blocks["block_error_start"].mean(),
        "error_end": blocks["block_error_end"].mean(),
        "reconstruction": reconstruction,
        "seconds": seconds,
    }
    return row, Measured(steps, seconds, reconstruction)


def line(row: dict) -> str:
    return (
        f"| {row['steps']:,} | {row['compressed']:.1f} | {row['top1']:.1f} | "
        f"{row['bits_per_weight']:.2f} | {row['model_bits_per_weight']:.2f} | "
        f"{row['error_start']:.4f} -> {row['error_end']:.4f} | {row['reconstruction']:.0f} | "
        f"{row['seconds']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 2000, 20000])
    parser.add_argument("--methods", nargs="+", default=["int2", "int4"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--bits-budget", type=float, default=3.0)
    parser.add_argument("--calib-images", type=int, default=80)
    parser.add_argument("--threads", type=int, help="the driver's --threads")
    parser.add_argument("--time-limit", type=float, default=float("inf"), metavar="SECONDS")
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    if sorted(args.steps) != args.steps or args.steps[0] < 1:
        parser.error("--steps must be positive and increasing")
    print(
        f"EfficientNet-Lite0, --layers all, --bits-budget {args.bits_budget:g} over "
        f"{' '.join(args.methods)} x ranks {' '.join(map(str, args.ranks))} (kl, budget only), "
        f"block reconstruction with learned rounding, {args.calib_images} calibration images, "
        f"training-free; {machine()}",
        flush=True,
    )
    header = (
        "| steps per block | compressed only | top-1 | bits/weight | model bits/weight "
        "| mean block error | reconstruction s | run s |\n|---|---|---|---|---|---|---|---|"
    )
    started, done, last = time.perf_counter(), [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for wanted in args.steps:
            left = args.time_limit - (time.perf_counter() - started)
            steps, predicted = affordable(wanted, done, left)
            if steps <= last:
                print(f"{wanted:,} steps per block: not run; {left:.0f} s left, and even "
                      f"{last + 100:,} would not fit", flush=True)  # fmt: skip
                break
            if steps != wanted:
                print(f"{wanted:,} steps per block would not fit in the {left:.0f} s left: "
                      f"{steps:,} instead (predicted {predicted:.0f} s)", flush=True)  # fmt: skip
            row, measured = one_run(args, steps, Path(scratch))
            done.append(measured)
            last = steps
            if len(done) == 1:
                print(f"original: {row['original']:.1f}\n{header}", flush=True)
            print(line(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
