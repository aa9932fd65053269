"""The README's whole-network table: EfficientNet-Lite0 with every pointwise conv and the FC
compressed (``--layers all``), training-free (``--epochs 0``), on the real ImageNet sample.

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    python -m benchmarks.table_whole_network [--data-dir ../shared/imagenet-sample]

For int4 and int2, at two ranks, it runs the driver twice, with ``svd_init`` (the truncated SVD
of each layer's residual W - W_c) and with ``act_svd_init`` computed sequentially (each layer's
init sees the inputs the already compressed layers before it produce), and prints a markdown
table of test top-1 against bits per weight (adapters at fp16), with the difference between
the two inits at equal bits. The split is 40% train (only the calibration images come from it),
10% val, 50% test: 100 test images, so one image is one point of accuracy.
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
INITS = ("svd_init", "act_svd_init")


def run(init: str, args: argparse.Namespace, results: Path) -> pd.DataFrame:
    code = train_main(
        [
            "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(args.data_dir),
            "--layers", "all", "--epochs", "0", "--init", init,
            "--methods", *args.methods, "--ranks", *map(str, args.ranks),
            "--adapter-dtype", "fp16", "--split", "0.4", "0.1", "0.5",
            "--calib-images", str(args.calib_images), "--results-dir", str(results),
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"the driver failed for {init} (exit {code})")
    (csv,) = results.glob(f"*/*/{init}_layers-all/evaluation.csv")
    return pd.read_csv(csv)


def table(frames: dict[str, pd.DataFrame]) -> str:
    svd, act = frames["svd_init"], frames["act_svd_init"]
    lines = [
        "| compression | rank | bits/weight | svd_init top-1 | act_svd_init (sequential) top-1 "
        "| difference |",
        "|---|---|---|---|---|---|",
    ]
    for (_, a), (_, b) in zip(svd.iterrows(), act.iterrows(), strict=True):
        assert (a["quant"], a["lora_rank"]) == (b["quant"], b["lora_rank"])
        assert abs(a["bits_per_weight"] - b["bits_per_weight"]) < 1e-9  # equal bits
        if a["lora_rank"] == "original":
            lines.append(f"| fp32 | - | 32 | {a['evaluation']:.1f} | {b['evaluation']:.1f} | - |")
            continue
        rank = "none" if a["lora_rank"] == "quantized" else a["lora_rank"]
        difference = b["evaluation"] - a["evaluation"]
        lines.append(
            f"| {a['quant']} | {rank} | {a['bits_per_weight']:.2f} | {a['evaluation']:.1f} | "
            f"{b['evaluation']:.1f} | {difference:+.1f} |"
        )
    seen, kept = set(), []
    for line in lines:  # the fp32 row appears once per method
        if line.startswith("| fp32") and line in seen:
            continue
        seen.add(line)
        kept.append(line)
    return "\n".join(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--methods", nargs="+", default=["int4", "int2"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--calib-images", type=int, default=512)
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    with tempfile.TemporaryDirectory() as scratch:
        frames = {init: run(init, args, Path(scratch)) for init in INITS}
    print(table(frames))
    return 0


if __name__ == "__main__":
    sys.exit(main())
