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

``--sections options`` rebuilds each budget's allocation with the calibration and
reconstruction options all on, each off in turn, and with the budget chosen on
``kl-reconstructed`` sensitivities (priced after ``--sensitivity-steps`` block steps each, a
proxy for the models' own 100) (``options_table``); it runs after the budgets section.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

from benchmarks.common import finished_runs, missing_inputs
from train_evaluate.train_model import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
SECTIONS = ("uniform", "budgets", "brecq", "options")
# (label, driver options): data-blind first
ROUNDINGS = (
    ("rtn, max scale", ["--int-scale", "max", "--quantizer", "rtn"]),
    ("gptq, mse scale", ["--int-scale", "mse", "--quantizer", "gptq", "--scale-dtype", "fp16"]),
)


def run(selection: str, init: str, options: list[str], args: argparse.Namespace, results: Path):
    """One selection with every method and rank of ``args``, under one rounding."""
    return driver(
        ["--layers", selection, "--init", init, "--methods", *args.methods,
         "--ranks", *map(str, args.ranks), *options],
        args, results,
    )  # fmt: skip


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


# the targets of the grid issue, on model_bits_per_weight: (at most these bits, within these
# points of the original's top-1)
TARGETS = ((3.0, 5.0), (2.5, 10.0))
# as BRECQ counts its operating points (Li et al. 2021, arXiv:2102.05426): every layer at W
# bits, the first and last at 8, per-channel affine grids, block reconstruction with learned
# rounding; no adapter
BRECQ_WIDTHS = (3, 2)


def brecq_plan(bits: int, folder: Path) -> Path:
    """The layer plan of BRECQ's W<bits> operating point on EfficientNet-Lite0 (its stem and
    FC at 8 bits, every other layer at ``bits``, affine grid, no adapter)."""
    path = folder / f"brecq-w{bits}.json"
    layers = {
        "conv_stem": {"method": "int8-affine", "rank": 0},
        "classifier": {"method": "int8-affine", "rank": 0},
        "*": {"method": f"int{bits}-affine", "rank": 0},
    }
    path.write_text(json.dumps({"name": f"brecq-w{bits}", "layers": layers}, indent=1))
    return path


def driver(options: list[str], args: argparse.Namespace, results: Path) -> pd.DataFrame:
    """One driver run on EfficientNet-Lite0, training-free, adapters at fp16; its
    evaluation.csv."""
    code = train_main(
        [
            "--model", MODEL, "--weights", str(args.weights), "--data-dir", str(args.data_dir),
            "--epochs", "0", "--adapter-dtype", "fp16", "--split", "0.4", "0.1", "0.5",
            "--calib-images", str(args.calib_images), "--results-dir", str(results), *options,
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"the driver failed for {' '.join(options)} (exit {code})")
    (csv,) = finished_runs(results)
    return pd.read_csv(csv)


def against_targets(bits: float, top1: float, original: float) -> str:
    """Each target this row can be held to (its bits at most the target's), met or missed by
    how many points."""
    said = []
    for limit, points in TARGETS:
        if bits <= limit:
            gap = top1 - (original - points)
            verdict = "met" if gap >= 0 else f"missed by {-gap:.0f}"
            said.append(f"<= {limit:g} bits, within {points:g}: {verdict}")
    return "; ".join(said) or "-"


def budget_table(frames: list[pd.DataFrame]) -> str:
    """The budgeted rows and the BRECQ-style rows, on model bits, against the targets."""
    original = frames[0].loc[frames[0]["lora_rank"] == "original", "evaluation"].iloc[0]
    # each model's own row (its rank's: for a budget, the compressed model itself; for
    # BRECQ's points, after reconstruction), not the original's nor the compressed-only one
    rows = [
        row
        for frame in frames
        for _, row in frame.iterrows()
        if str(row["quant"]).startswith(("budget", "brecq"))
        and row["lora_rank"] not in ("original", "quantized")
    ]
    lines = [
        f"EfficientNet-Lite0, original top-1 {original:.1f}:",
        "",
        "| model | model bits/weight | selected bits/weight | top-1 | against the targets |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: row["model_bits_per_weight"]):
        bits = row["model_bits_per_weight"]
        lines.append(
            f"| {row['quant']} | {bits:.2f} | {row['bits_per_weight']:.2f} | "
            f"{row['evaluation']:.1f} | {against_targets(bits, row['evaluation'], original)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--layers", nargs="+", default=["all", "head"], choices=["all", "head"])
    parser.add_argument("--methods", nargs="+", default=["int4-affine", "int3-affine"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16])
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--inits", nargs="+", default=["svd_init"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0])
    parser.add_argument(
        "--budget-methods", nargs="+", default=["int2-affine", "int3-affine", "int4-affine",
                                                "int8-affine"],
    )  # fmt: skip
    parser.add_argument("--budget-ranks", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--sensitivity-steps",
        type=int,
        default=SENSITIVITY_STEPS,
        help="the options section's kl-reconstructed row: the block steps of each option's "
        f"reconstruction while the budget prices it (default: {SENSITIVITY_STEPS}, an eighth of "
        "the models' own; all of them take about eight times as long)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results/leaderboard"),
        help="the driver's run folders (default: results/leaderboard); a rerun reuses every "
        "finished rank, so an interrupted leaderboard resumes",
    )
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    tables = []
    if "uniform" in args.sections:
        for selection in args.layers:
            frames = {}
            for init in args.inits:
                for label, options in ROUNDINGS:
                    where = args.results_dir / f"{selection}-{init}-{label.replace(', ', '-')}"
                    frames[init, label] = run(selection, init, options, args, where)
            tables.append(table(selection, frames))
    if {"budgets", "brecq"} & set(args.sections):
        tables.append(budgets(args))
    if "options" in args.sections:
        tables.append(options_table(args))
    print("\n\n".join(tables))
    return 0


def budgets(args: argparse.Namespace) -> str:
    """The bit budgets over the whole model and BRECQ's operating points, one table."""
    frames = []
    if "budgets" in args.sections:
        calibrated = ["--quantizer", "gptq", "--int-scale", "mse", "--scale-dtype", "fp16"]
        frames.append(driver(
            ["--layers", "all", "--init", "svd_init", "--methods", *args.budget_methods,
             "--ranks", *map(str, args.budget_ranks), "--bits-budget", *map(str, args.budgets),
             "--budget-only", "--budget-sensitivity", "kl", *calibrated],
            args, args.results_dir / "budgets",
        ))  # fmt: skip
    if "brecq" in args.sections:
        for bits in BRECQ_WIDTHS:
            where = args.results_dir / f"brecq-w{bits}"
            where.mkdir(parents=True, exist_ok=True)
            options = ["--layer-plan", str(brecq_plan(bits, where)), "--init", "svd_init",
                       "--quantizer", "adaround", "--int-scale", "mse", "--scale-dtype", "fp16",
                       "--reconstruct", "block"]  # fmt: skip
            frames.append(driver(options, args, where / "runs"))
    return budget_table(frames)


# the calibration and reconstruction options, all on, and each of them off in turn; every row
# takes the layer plan its budget chose (so only the options differ), and the budget's own row
# (GPTQ alone, no reconstruction) is every option off
ALL_ON = [
    "--quantizer", "gptq-adaround", "--reconstruct", "block", "--calib-augment", "4",
    "--reconstruct-drop", "0.5",
]  # fmt: skip
# kl-reconstructed's block steps while it prices options: at the models' own 100 steps the
# pricing takes about 8 minutes a layer here (50 layers), at 12 about one (52 minutes in all)
SENSITIVITY_STEPS = 12
# AdaRound's relaxation, with a regulariser and a rate that reach the grid in 100 steps
SOFT_ROUNDING = ["--rounding-relaxation", "soft", "--rounding-weight", "1", "--rounding-lr", "0.1"]
OPTION_VARIANTS = (
    ("all on", ALL_ON),
    ("soft rounding", [*ALL_ON, *SOFT_ROUNDING]),
    ("views off", [o for o in ALL_ON if o not in ("--calib-augment", "4")]),
    ("held-out off", [*ALL_ON, "--reconstruct-held-out", "0"]),
    ("QDrop off", [o for o in ALL_ON if o not in ("--reconstruct-drop", "0.5")]),
    ("GPTQ start off", ["--quantizer", "adaround", *ALL_ON[2:]]),
)


def budget_plans(args: argparse.Namespace) -> tuple[dict[float, Path], pd.DataFrame]:
    """The layer plan the budgets section chose for each budget, and that run's evaluation.csv
    (the section runs first where it has not)."""
    folder = args.results_dir / "budgets"
    if not finished_runs(folder):
        budgets(argparse.Namespace(**{**vars(args), "sections": ["budgets"]}))
    (csv,) = finished_runs(folder)
    return plan_files(csv, args.budgets), pd.read_csv(csv)


def plan_files(csv: Path, budgets: list[float]) -> dict[float, Path]:
    """The layer plan a budgeted run wrote for each budget (rank 0 everywhere), beside its
    evaluation.csv."""
    return {budget: csv.parent / "plans" / f"quant=budget{budget:g}_r=0.json" for budget in budgets}


def methods_and_ranks(plan: Path, folder: Path) -> Path:
    """A copy of ``plan`` with each layer's method and rank and not the compression it records
    (GPTQ, no reconstruction), so that runs with other calibration options take the same
    allocation."""
    raw = json.loads(plan.read_text())
    for entry in raw["layers"].values():
        entry.pop("compression", None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / plan.name
    path.write_text(json.dumps(raw, indent=1))
    return path


def finished(options: list[str], args: argparse.Namespace, results: Path) -> pd.DataFrame:
    """``driver``, or the evaluation.csv of a run already finished there (read back, so that a
    rerun of the leaderboard does not compress and score its models again)."""
    done = finished_runs(results)
    return pd.read_csv(done[0]) if done else driver(options, args, results)


def variant_rows(
    label: str,
    options: list[str],
    plans: dict[float, Path],
    args: argparse.Namespace,
    compressed_label: str | None = None,
    allocation: str = "",
) -> list[dict]:
    """Each budget's methods and ranks (chosen on kl sensitivities, or as ``allocation`` names
    them: a prefix of the run folders and plans) run with ``options``; with
    ``compressed_label``, also each run's compressed-only row (before reconstruction)."""
    rows, slug = [], re.sub(r"[^\w.]+", "-", label).strip("-")  # "all on" -> all-on
    for budget, plan in plans.items():
        where = args.results_dir / "options" / f"{allocation}budget{budget:g}-{slug}"
        plan = methods_and_ranks(plan, args.results_dir / "options" / f"{allocation}plans")
        common = ["--layer-plan", str(plan), "--init", "svd_init", "--int-scale", "mse",
                  "--scale-dtype", "fp16"]  # fmt: skip
        frame = finished([*common, *options], args, where)
        row = frame[~frame["lora_rank"].isin(["original", "quantized"])].iloc[-1]
        rows.append({**row, "quant": f"budget{budget:g}", "variant": label})
        if compressed_label is not None:
            row = frame[frame["lora_rank"] == "quantized"].iloc[-1]
            rows.append({**row, "quant": f"budget{budget:g}", "variant": compressed_label})
    return rows


def reconstructed_sensitivity_rows(args: argparse.Namespace) -> list[dict]:
    """The budgets solved on ``kl-reconstructed`` sensitivities (each option's KL after its
    block's reconstruction, of ``--sensitivity-steps`` steps: a proxy where fewer than the
    models' own), their models built with every option on, then with GPTQ's start off and
    with QDrop off."""
    folder = f"kl-reconstructed-{args.sensitivity_steps}-steps"
    frame = finished(
        ["--layers", "all", "--init", "svd_init", "--methods", *args.budget_methods,
         "--ranks", *map(str, args.budget_ranks), "--bits-budget", *map(str, args.budgets),
         "--budget-only", "--budget-sensitivity", "kl-reconstructed", "--int-scale", "mse",
         "--scale-dtype", "fp16", *ALL_ON, "--budget-sensitivity-steps",
         str(args.sensitivity_steps)],
        args, args.results_dir / "options" / folder,
    )  # fmt: skip
    chosen = frame["quant"].str.startswith("budget") & ~frame["lora_rank"].isin(
        ["original", "quantized"]
    )
    label = f"all on, kl-reconstructed ({args.sensitivity_steps} steps)"
    rows = [{**row, "variant": label} for _, row in frame[chosen].iterrows()]
    # its allocations with the two options whose removal did best on kl's
    (csv,) = finished_runs(args.results_dir / "options" / folder)
    plans = plan_files(csv, args.budgets)
    for off, options in OPTION_VARIANTS:
        if off in ("GPTQ start off", "QDrop off"):
            label = f"kl-reconstructed ({args.sensitivity_steps} steps), {off}"
            rows += variant_rows(label, options, plans, args, allocation="kl-reconstructed-")
    return rows


def options_table(args: argparse.Namespace) -> str:
    """Each budget's model with the calibration and reconstruction options all on and each off,
    and all on with the budget solved on ``kl-reconstructed`` sensitivities, on model bits, the
    front marked, against the targets."""
    plans, frame = budget_plans(args)
    original = frame.loc[frame["lora_rank"] == "original", "evaluation"].iloc[0]
    rows = []
    for budget in args.budgets:
        row = frame[(frame["quant"] == f"budget{budget:g}") & (frame["lora_rank"] != "quantized")]
        rows.append({**row.iloc[-1], "variant": "all off (GPTQ alone)"})
    (first, second, *others) = OPTION_VARIANTS  # all on, soft rounding, then each option off
    # all on's compressed-only rows: GPTQ on the views, before any reconstruction
    rows += variant_rows(*first, plans, args, compressed_label="GPTQ on 4 views, no reconstruction")
    rows += variant_rows(*second, plans, args)
    for label, options in others:
        rows += variant_rows(label, options, plans, args)
    # last: its sensitivity pass reconstructs a block per option, the longest of these runs
    rows += reconstructed_sensitivity_rows(args)
    frame = pd.DataFrame(rows)
    frame["front"] = pareto(frame)
    lines = [
        f"EfficientNet-Lite0, each budget's layer plan, original top-1 {original:.1f}:",
        "",
        "| budget | options | model bits/weight | top-1 | on the front | against the targets |",
        "|---|---|---|---|---|---|",
    ]
    order = frame.sort_values(["model_bits_per_weight", "evaluation"], ascending=[True, False])
    for row in order.itertuples():
        bits = row.model_bits_per_weight
        lines.append(
            f"| {row.quant} | {row.variant} | {bits:.2f} | {row.evaluation:.1f} | "
            f"{'yes' if row.front else ''} | "
            f"{against_targets(bits, row.evaluation, original)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
