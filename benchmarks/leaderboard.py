"""The README's leaderboard: EfficientNet-Lite0's top-1 against bits per weight for each
compressor, data-blind and calibrated, on the real ImageNet sample, training-free.

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    python -m benchmarks.leaderboard [--data-dir ../shared/imagenet-sample] [--layers all head]

For each selection (``all``: every pointwise conv and the FC; ``head``: the FC alone), each
rounding (``rtn`` with the ``max`` scale: data-blind; ``rtn`` with the ``mse`` scale and
``gptq``: calibrated on the layers' inputs), each init (``--inits``: ``svd_init``, the SVD of
each layer's residual, and ``act_svd_init``, its activation-aware form) and each method, it
runs the driver with ``--epochs 0`` (the init only: no training), and prints one markdown
table per selection: the compressed-only row and each rank's row, with the whole model's bits
per weight (``model_bits_per_weight``: every stored bit of the model, adapters at fp16, over
all its weights; the x axis, and what ``--bits-budget`` bounds), the selected layers' bits per
weight and test top-1, the Pareto-optimal rows (no other row has at least the accuracy with
fewer model bits) marked. The split is 40% train (the
calibration images and, for the FC, the features the calibrated compressors see), 10% val,
50% test: 100 test images, so one image is one point of accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.common import missing_inputs
from train_evaluate.train_model import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
# (label, driver options): data-blind first
ROUNDINGS = (
    ("rtn, max scale", ["--int-scale", "max", "--quantizer", "rtn"]),
    ("rtn, mse scale", ["--int-scale", "mse", "--quantizer", "rtn"]),
    ("gptq, max scale", ["--int-scale", "max", "--quantizer", "gptq"]),
)


def run(selection: str, init: str, options: list[str], args: argparse.Namespace, results: Path):
    code = train_main(
        [
            "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(args.data_dir),
            "--layers", selection, "--epochs", "0", "--init", init,
            "--methods", *args.methods, "--ranks", *map(str, args.ranks),
            "--adapter-dtype", "fp16", "--split", "0.4", "0.1", "0.5",
            "--calib-images", str(args.calib_images), "--results-dir", str(results), *options,
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"the driver failed for --layers {selection} {options} (exit {code})")
    folder = init if selection == "head" else f"{init}_layers-{selection}"
    (csv,) = results.glob(f"*/*/{folder}/evaluation.csv")
    return pd.read_csv(csv)


def pareto(rows: pd.DataFrame) -> pd.Series:
    """Rows no other row beats: at least the accuracy with fewer model bits, or more accuracy
    with at most the bits."""
    bits, accuracy = rows["model_bits_per_weight"].to_numpy(), rows["evaluation"].to_numpy()
    return pd.Series(
        [
            not any(
                (b <= bits[i] and a >= accuracy[i]) and (b < bits[i] or a > accuracy[i])
                for b, a in zip(bits, accuracy, strict=True)
            )
            for i in range(len(rows))
        ],
        index=rows.index,
    )


def table(selection: str, frames: dict[tuple[str, str], pd.DataFrame]) -> str:
    rows, seen = [], set()
    for (init, label), frame in frames.items():
        for _, row in frame.iterrows():
            rank = {"original": "-", "quantized": "none"}.get(row["lora_rank"], row["lora_rank"])
            # the fp32 row once; a compressed-only row once per rounding (no init involved)
            key = (row["quant"] if rank != "-" else "", label if rank != "-" else "", rank)
            if rank in ("-", "none") and key in seen:
                continue
            seen.add(key)
            rows.append(
                {
                    "compression": "fp32" if rank == "-" else row["quant"],
                    "rounding": "-" if rank == "-" else label,
                    "init": init if rank not in ("-", "none") else "-",
                    "rank": rank,
                    "model_bits_per_weight": row["model_bits_per_weight"],
                    "bits_per_weight": row["bits_per_weight"],
                    "evaluation": row["evaluation"],
                }
            )
    frame = pd.DataFrame(rows)
    frame["front"] = pareto(frame)
    frame = frame.sort_values(["model_bits_per_weight", "evaluation"], ascending=[True, False])
    lines = [
        f"`--layers {selection}`:",
        "",
        "| compression | rounding | init | rank | model bits/weight | selected bits/weight "
        "| top-1 | on the front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in frame.itertuples():
        lines.append(
            f"| {row.compression} | {row.rounding} | {row.init} | {row.rank} | "
            f"{row.model_bits_per_weight:.2f} | {row.bits_per_weight:.2f} | "
            f"{row.evaluation:.1f} | {'yes' if row.front else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--layers", nargs="+", default=["all", "head"], choices=["all", "head"])
    parser.add_argument("--methods", nargs="+", default=["int4", "int2"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16])
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--inits", nargs="+", default=["svd_init", "act_svd_init"])
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="keep the driver's run folders here (a rerun then reuses every finished rank); "
        "default: a temporary folder per run",
    )
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    tables = []
    for selection in args.layers:
        frames = {}
        for init in args.inits:
            for label, options in ROUNDINGS:
                if args.results_dir is not None:
                    where = args.results_dir / f"{selection}-{label.replace(', ', '-')}"
                    frames[init, label] = run(selection, init, options, args, where)
                    continue
                with tempfile.TemporaryDirectory() as scratch:
                    frames[init, label] = run(selection, init, options, args, Path(scratch))
        tables.append(table(selection, frames))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
