"""Below four bits: EfficientNet-Lite0 compressed throughout (``--layers all``), training-free
(``--epochs 0``), with and without the asymmetric fit, block and network reconstruction and
learned rounding, on the real ImageNet sample.

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    python -m benchmarks.table_reconstruction [--ranks 8 16] [--methods int2 int4] [--variants ...]
        [--bits-budget 4 [--budget-sensitivity kl]]

Every variant runs the driver once: each method (default int2) with the mse scale,
``act_svd_init``, adapters at fp16, the split 40/10/50 (80 train images, all of them
calibration images; 100 test images, so one image is one point of accuracy). It prints one
markdown table (bits per weight: every stored bit of the selected layers; the model's own
column: every bit of the whole model over its conv and linear weights; test top-1; the seconds
the run took; the rows no other row beats with at most its bits marked) and the two targets of
the project's sub-4-bit work, met or not and by how much: at most 3.0 bits per weight within 5
points of the original's top-1, at most 2.5 within 10.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import finished_runs, machine, missing_inputs
from benchmarks.leaderboard import pareto
from train_evaluate.train_model import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
# (label, driver options)
VARIANTS = (
    ("sequential fit", []),
    ("asymmetric fit", ["--calibration", "asymmetric"]),
    ("block reconstruction", ["--reconstruct", "block"]),
    ("block, learned rounding", ["--reconstruct", "block", "--quantizer", "adaround"]),
    ("network reconstruction", ["--reconstruct", "network"]),
    ("network, learned rounding", ["--reconstruct", "network", "--quantizer", "adaround"]),
)
TARGETS = ((3.0, 5.0), (2.5, 10.0))  # (at most this many bits per weight, within these points)


def run(options: list[str], args: argparse.Namespace, results: Path) -> pd.DataFrame:
    code = train_main(
        [
            "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(args.data_dir),
            "--layers", "all", "--epochs", "0", "--init", "act_svd_init",
            "--methods", *args.methods, "--int-scale", "mse", "--ranks", *map(str, args.ranks),
            "--adapter-dtype", "fp16",
            "--split", "0.4", "0.1", "0.5", "--calib-images", str(args.calib_images),
            "--results-dir", str(results), *options, *budget_options(args),
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"the driver failed for {options} (exit {code})")
    (csv,) = finished_runs(results)
    return pd.read_csv(csv)


def budget_options(args: argparse.Namespace) -> list[str]:
    """--bits-budget B...: every variant also runs its budgeted models (rows ``budget<B>``)."""
    if args.bits_budget is None:
        return []
    return [
        "--bits-budget", *(f"{b:g}" for b in args.bits_budget),
        "--budget-sensitivity", args.budget_sensitivity,
    ]  # fmt: skip


def targets(frame: pd.DataFrame, original: float) -> list[str]:
    lines = []
    for bits, points in TARGETS:
        within = frame[frame["bits_per_weight"] <= bits]
        if within.empty:
            lines.append(f"- at most {bits} bits per weight: no row; not met")
            continue
        best = within.loc[within["evaluation"].idxmax()]
        gap = original - best["evaluation"]
        verdict = "met" if gap <= points else f"not met, by {gap - points:.1f} points"
        lines.append(
            f"- at most {bits} bits per weight within {points:g} points of {original:.1f}: best "
            f"{best['evaluation']:.1f} ({best['method']}, {best['variant']}, rank {best['rank']}, "
            f"{best['bits_per_weight']:.2f} bits), {gap:.1f} below: {verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--methods", nargs="+", default=["int2"])
    parser.add_argument("--calib-images", type=int, default=80)
    parser.add_argument("--variants", nargs="+", choices=[v for v, _ in VARIANTS])
    parser.add_argument(
        "--bits-budget",
        type=float,
        nargs="+",
        help="also run, in every variant, one model per budget whose layers each take a method "
        "and rank from --methods x --ranks within that many bits per weight",
    )
    parser.add_argument(
        "--budget-sensitivity",
        choices=("output", "kl"),
        default="output",
        help="what the budget minimises (the driver's option of that name)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="keep the driver's run folders here; default: a temporary folder per run",
    )
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    rows, original = [], None
    for label, options in VARIANTS:
        if args.variants and label not in args.variants:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            where = Path(scratch) if args.results_dir is None else args.results_dir / label
            frame = run(options, args, where.resolve())
        seconds = time.perf_counter() - started
        print(f"{label}: {seconds:.0f} s", flush=True)
        for _, row in frame.iterrows():
            rank = {"original": "-", "quantized": "none"}.get(row["lora_rank"], row["lora_rank"])
            if rank == "-":
                original = row["evaluation"]
                continue
            seen = {(r["method"], r["rank"]) for r in rows}
            if rank == "none" and (row["quant"], "none") in seen:
                continue  # the compressed-only row once: no init or reconstruction in it
            rows.append({
                "method": row["quant"], "variant": label if rank != "none" else "-", "rank": rank,
                "bits_per_weight": row["bits_per_weight"],
                "model_bits_per_weight": row["model_bits_per_weight"],
                "evaluation": row["evaluation"], "seconds": seconds if rank != "none" else None,
            })  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["front"] = pareto(frame)
    frame = frame.sort_values(["bits_per_weight", "evaluation"], ascending=[True, False])
    lines = [
        f"EfficientNet-Lite0, `--layers all`, mse scale, act_svd_init, fp16 adapters, "
        f"training-free; original {original:.1f}; {machine()}",
        "",
        "| method | variant | rank | bits/weight | model bits/weight | top-1 | run seconds "
        "| front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in frame.itertuples():
        seconds = "" if pd.isna(row.seconds) else f"{row.seconds:.0f}"
        lines.append(
            f"| {row.method} | {row.variant} | {row.rank} | {row.bits_per_weight:.2f} | "
            f"{row.model_bits_per_weight:.2f} | {row.evaluation:.1f} | {seconds} | "
            f"{'yes' if row.front else ''} |"
        )
    print("\n".join([*lines, "", *targets(frame, original)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
