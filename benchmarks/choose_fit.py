"""The act-aware fits' ridge and asymmetric strength (``--fit-ridge``, ``--asymmetric-strength``),
chosen on the validation split of the real ImageNet sample, never its test split.

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    python -m benchmarks.choose_fit [--calib-images 64] [--rank 16] [--method int2]

Each setting runs the driver once on EfficientNet-Lite0, every Linear and Conv2d compressed
(``--layers all``), training-free (``--epochs 0``), ``act_svd_init`` at one rank, the mse scale,
adapters at fp16, the split 40/20/40 (80 train images, of which the calibration images; 40
validation images, on which the setting is chosen; 80 test images, read only to report). It
prints one markdown table (validation and test top-1 of each setting, the seconds it took), the
setting with the highest validation top-1 (ties: the earlier in the table, today's defaults
first) and its test top-1 against the defaults'. Run folders are kept under ``--results-dir``:
a setting whose folder holds a finished run is read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import finished_runs, machine, missing_inputs
from train_evaluate.train_model import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
ASYMMETRIC = ["--calibration", "asymmetric"]
# (label, driver options); the first of each calibration is today's default
SETTINGS = (
    ("symmetric, ridge 1e-4", []),
    ("symmetric, ridge 1e-2", ["--fit-ridge", "1e-2"]),
    ("symmetric, ridge 1e-1", ["--fit-ridge", "1e-1"]),
    ("symmetric, ridge 1", ["--fit-ridge", "1"]),
    ("asymmetric s=1, ridge 1e-4", ASYMMETRIC),
    ("asymmetric s=0.25, ridge 1e-4", [*ASYMMETRIC, "--asymmetric-strength", "0.25"]),
    ("asymmetric s=1, ridge 1e-1", [*ASYMMETRIC, "--fit-ridge", "1e-1"]),
    ("asymmetric s=0.25, ridge 1e-1", [*ASYMMETRIC, "--asymmetric-strength", "0.25",
                                       "--fit-ridge", "1e-1"]),
)  # fmt: skip


def run(options: list[str], args: argparse.Namespace, results: Path) -> float:
    """Runs one setting unless its folder holds a finished run; its seconds (0 when read back)."""
    if finished_runs(results):
        return 0.0
    started = time.perf_counter()
    code = train_main(
        [
            "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(args.data_dir),
            "--layers", "all", "--epochs", "0", "--init", "act_svd_init",
            "--methods", args.method, "--int-scale", "mse", "--ranks", str(args.rank),
            "--adapter-dtype", "fp16", "--split", "0.4", "0.2", "0.4",
            "--calib-images", str(args.calib_images), "--results-dir", str(results), *options,
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"the driver failed for {options} (exit {code})")
    return time.perf_counter() - started


def scores(results: Path, method: str, rank: int) -> dict[str, float]:
    """Validation and test top-1 of the rank's model (the init: the run is training-free), from
    its record, and the original's test top-1 from evaluation.csv."""
    (folder,) = {path.parent for path in finished_runs(results)}
    record = json.loads((folder / "records" / f"{method}_r{rank}.json").read_text())
    frame = pd.read_csv(folder / "evaluation.csv")
    original = frame.loc[frame["lora_rank"] == "original", "evaluation"].iloc[0]
    return {
        "val": record["init_only"]["val_acc"],
        "test": record["init_only"]["test_acc"],
        "original": float(original),
    }


def seconds(value: float) -> str:
    return f"{value:.0f}" if value else "read back"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--method", default="int2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--results-dir", type=Path, default=Path("results/fit-choice"))
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    rows = []
    for label, options in SETTINGS:
        folder = (args.results_dir / label.replace(" ", "").replace(",", "_")).resolve()
        took = run(options, args, folder)
        rows.append({"setting": label, **scores(folder, args.method, args.rank), "s": took})
        print(f"{label}: val {rows[-1]['val']:.1f}, test {rows[-1]['test']:.1f}", flush=True)
    frame = pd.DataFrame(rows)
    chosen = frame.loc[frame["val"].idxmax()]  # the first of the highest
    lines = [
        f"EfficientNet-Lite0, `--layers all`, {args.method} mse scale, act_svd_init rank "
        f"{args.rank}, fp16 adapters, {args.calib_images} calibration images, training-free; "
        f"original {frame['original'].iloc[0]:.1f} on test; {machine()}",
        "",
        "| setting | val top-1 (40 images) | test top-1 (80 images) | run seconds |",
        "|---|---|---|---|",
        *(
            f"| {r.setting} | {r.val:.1f} | {r.test:.1f} | {seconds(r.s)} |"
            for r in frame.itertuples()
        ),
        "",
        f"chosen on val: {chosen['setting']} (val {chosen['val']:.1f}); its test top-1 "
        f"{chosen['test']:.1f} against {frame['test'].iloc[0]:.1f} with today's defaults",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
