"""Everything a run writes into its results folder, and nothing else.

Per rank (names as in the original study): ``acc_quant=<m>_r=<r>.png``,
``loss_quant=<m>_r=<r>.png``, ``quant=<m>_r=<r>_optimization_history.html`` and a checkpoint
``checkpoints/quant=<m>_r=<r>.safetensors`` (packed, see checkpoint.py). Per run:
``evaluation.csv`` and ``accuracy_vs_rank.png``. Every file is written atomically (temp file +
rename).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from compression import LayerAccounting, StorageCost, account_layer, dense_cost, model_ratio
from lora import LoraLinear
from train_evaluate.checkpoint import write_packed
from train_evaluate.files import atomic_path, write_text

# evaluation.csv: the original study's three columns first, then ours (README explains each).
COLUMNS = [
    "quant",
    "lora_rank",
    "evaluation",
    "init",
    "init_only",
    "drop",
    "final_seeds",
    "evaluation_std",
    "ci95_low",
    "ci95_high",
    "ratio",
    "ratio_seed",
    "ratio_model",
    "compute_ratio",
    "bits",
    "file_bytes",
    "ratio_file",
    "file_evaluation",
    "best_val_acc",
    "best_epoch",
    "best_epochs",
    "optimizer",
    "lr",
    "batch_size",
    "lora_alpha",
    "status",
    "trials_complete",
    "trials_pruned",
    "trials_diverged",
    "compression",
    "objective",
    "dora",
    "bias_counted",
    "seed",
    "seconds",
]
TIMING_COLUMNS = ["seconds"]


def stem(method: str, rank: int) -> str:
    return f"quant={method}_r={rank}"


def checkpoint_path(out: Path, method: str, rank: int) -> Path:
    return out / "checkpoints" / f"{stem(method, rank)}.safetensors"


def rank_artifacts(out: Path, method: str, rank: int) -> list[Path]:
    name = stem(method, rank)
    return [
        out / f"acc_{name}.png",
        out / f"loss_{name}.png",
        out / f"{name}_optimization_history.html",
        checkpoint_path(out, method, rank),
    ]


def save_figure(figure: Figure, target: Path) -> None:
    # Figure objects, not pyplot: no GUI backend, no global state to close.
    with atomic_path(target) as path:
        figure.savefig(path, format="png", dpi=110, bbox_inches="tight")


def stack_histories(finals: list[dict[str, Any]], key: str) -> np.ndarray:
    """seeds x epochs, NaN-padded where a run stopped early (diverged)."""
    length = max(len(f["history"][key]) for f in finals)
    table = np.full((len(finals), length), np.nan)
    for row, final in enumerate(finals):
        values = final["history"][key]
        table[row, : len(values)] = values
    return table


def plot_epochs(finals: list[dict[str, Any]], metric: str, title: str) -> Figure:
    """Train and val ``metric`` per epoch (0 = the init) of the final model, the selected epoch
    marked; with several final seeds, their mean and a +-1 std band."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for split in ("train", "val"):
        table = stack_histories(finals, f"{split}_{metric}")
        if np.isnan(table).all():  # e.g. train accuracy when the train labels are hidden (kd)
            continue
        with np.errstate(all="ignore"):  # all-NaN columns after a diverged seed
            mean, std = np.nanmean(table, axis=0), np.nanstd(table, axis=0)
        epochs = np.arange(table.shape[1])
        label = split if len(finals) == 1 else f"{split} (mean of {len(finals)} seeds)"
        axes.plot(epochs, mean, marker="o", label=label)
        if len(finals) > 1:
            axes.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    best_epoch = finals[0]["best_epoch"]
    which = "selected" if len(finals) == 1 else "selected for seed 1"
    axes.axvline(best_epoch, color="grey", linestyle=":", label=f"{which} (epoch {best_epoch})")
    axes.set_xlabel("epoch (0 = init, before training)")
    axes.set_ylabel("top-1 accuracy (%)" if metric == "acc" else "cross-entropy loss")
    axes.set_title(title)
    axes.legend()
    return figure


def write_rank_artifacts(
    out: Path,
    record: dict[str, Any],
    layer: LoraLinear | None,
    study: optuna.Study | None,
    adapter_dtype: str,
    checkpoint_info: dict[str, Any],
) -> Path | None:
    """The per-rank files: curves, Optuna history and the packed checkpoint (whatever the rank
    produced). Returns the checkpoint's path, if one was written."""
    method, rank = record["method"], record["rank"]
    name = stem(method, rank)
    # A rerun replaces the rank's files; what it does not produce this time (no final model,
    # no study) must not stay behind from an earlier run, with another split or settings.
    for old in rank_artifacts(out, method, rank):
        old.unlink(missing_ok=True)
    if record["finals"]:
        for metric, word in (("acc", "Accuracy"), ("loss", "Loss")):
            figure = plot_epochs(record["finals"], metric, f"{word}, quant={method}, rank={rank}")
            save_figure(figure, out / f"{metric}_{name}.png")
    if study is not None and study.get_trials(deepcopy=False):
        html = optuna.visualization.plot_optimization_history(study)
        with atomic_path(out / f"{name}_optimization_history.html") as path:
            # plotly.min.js is written once beside the pages, so they open offline
            html.write_html(path, include_plotlyjs="directory")
    if layer is None:
        return None
    metrics = {k: record.get(k) for k in ("status", "test_acc", "objective", "seed")}
    metrics["init_only_test_acc"] = record["init_only"]["test_acc"]
    if record["finals"]:
        first = record["finals"][0]
        metrics.update(
            this_model_test_acc=first["test_acc"],
            best_epoch=first["best_epoch"],
            best_val_acc=first["best_val_acc"],
            train_seed=first["seed"],
        )
    info = {**checkpoint_info, "init": record["init"], "metrics": metrics}
    path = checkpoint_path(out, method, rank)
    write_packed(path, layer, adapter_dtype, info)
    return path


@dataclass(frozen=True)
class Accounting:
    """How a run prices its rows: the FC's shape, the adapter's stored dtype, whether DoRA's
    magnitudes and the bias are counted, and the bits of the rest of the model."""

    fc_shape: tuple[int, int]
    adapter_dtype_bits: int
    dora: bool
    include_bias: bool
    backbone_bits: int

    def columns(self, cost: StorageCost, rank: int) -> dict[str, Any]:
        """The ratio columns of a row: this layer, and the whole model around it."""
        layer = account_layer(
            *self.fc_shape,
            cost,
            rank,
            adapter_dtype_bits=self.adapter_dtype_bits,
            extra_adapter_params=self.fc_shape[0] if self.dora and rank else 0,
            include_bias=self.include_bias,
        )
        return accounting_columns(layer, model_ratio(self.backbone_bits, layer))

    @property
    def dense_bytes(self) -> int:
        """The uncompressed FC, weight and bias, at fp32: what ``ratio_file`` divides."""
        out_features, in_features = self.fc_shape
        return 4 * (out_features * in_features + out_features)


def accounting_columns(layer: LayerAccounting, model_ratio: float) -> dict[str, Any]:
    return {
        "ratio": layer.ratio,
        "ratio_seed": layer.ratio_seed,
        "ratio_model": model_ratio,
        "compute_ratio": layer.compute_ratio,
        "bits": layer.compressed_bits,
        "bias_counted": layer.include_bias,
    }


def method_rows(
    shared: dict[str, Any],
    original_acc: float,
    compressed_acc: float,
    cost: StorageCost,
    records: Sequence[dict[str, Any]],
    accounting: Accounting,
) -> list[dict[str, Any]]:
    """The ``original`` and ``quantized`` rows of one method, then one row per rank record.

    shared: the columns every row of the method carries (quant, init, seed, compression)."""
    rows = []
    for lora_rank, level_cost, acc in (
        ("original", dense_cost(*accounting.fc_shape), original_acc),
        ("quantized", cost, compressed_acc),
    ):
        rows.append(
            {**shared, "status": "ok", "lora_rank": lora_rank, "evaluation": acc,
             "drop": original_acc - acc, **accounting.columns(level_cost, 0)}
        )  # fmt: skip
    for record in records:
        rows.append(
            {
                **rank_row(record, original_acc, accounting.dense_bytes),
                **accounting.columns(cost, record["rank"]),
            }
        )
    return rows


def evaluation_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS]


def seed_statistics(values: list[float]) -> dict[str, float]:
    """Mean, sample std and Student-t 95% interval of the final models' test accuracies."""
    count = len(values)
    mean = float(np.mean(values))
    if count < 2:
        return {"evaluation": mean, "evaluation_std": None, "ci95_low": None, "ci95_high": None}
    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, count - 1)) * std / math.sqrt(count)
    return {"evaluation": mean, "evaluation_std": std, "ci95_low": mean - half,
            "ci95_high": mean + half}  # fmt: skip


def rank_row(record: dict[str, Any], original_acc: float, dense_bytes: int) -> dict[str, Any]:
    """One evaluation.csv row from a rank's record (accounting added by the caller).

    dense_bytes: the uncompressed FC's weight and bias at fp32, for ``ratio_file``."""
    finals = record["finals"]
    params = record.get("best_params") or {}
    if finals:
        row = seed_statistics([f["test_acc"] for f in finals])
        best_val = float(np.mean([f["best_val_acc"] for f in finals]))
        epochs = [f["best_epoch"] for f in finals]
    else:  # init only, or no final model
        row = {"evaluation": record["test_acc"]}
        best_val, epochs = record["init_only"]["val_acc"], [0]
    test_acc = row["evaluation"]
    return {
        **row,
        "quant": record["method"],
        "lora_rank": record["rank"],
        "init": record["init"],
        "init_only": record["init_only"]["test_acc"],
        "drop": None if test_acc is None else original_acc - test_acc,
        "final_seeds": len(finals),
        "best_val_acc": best_val,
        "best_epoch": epochs[0],
        "best_epochs": ";".join(map(str, epochs)),
        "optimizer": params.get("optimizer"),
        "lr": params.get("lr"),
        "batch_size": params.get("batch_size"),
        "lora_alpha": params.get("lora_alpha"),
        "status": record["status"],
        "trials_complete": record.get("trials", {}).get("complete"),
        "trials_pruned": record.get("trials", {}).get("pruned"),
        "trials_diverged": record.get("trials", {}).get("diverged"),
        "compression": record["compression"],
        "objective": record.get("objective"),
        "dora": record.get("dora"),
        "seed": record["seed"],
        "seconds": round(record["seconds"], 3),
        **file_columns(record, dense_bytes),
    }


def file_columns(record: dict[str, Any], dense_bytes: int) -> dict[str, Any]:
    """Size of the packed checkpoint, its ratio to the fp32 FC (weight and bias), and the test
    accuracy of the model rebuilt from it."""
    packed = record.get("file")
    if not packed:
        return {}
    return {
        "file_bytes": packed["bytes"],
        "ratio_file": dense_bytes / packed["bytes"],
        "file_evaluation": packed["test_acc"],
    }


def write_evaluation(out: Path, frame: pd.DataFrame) -> Path:
    target = out / "evaluation.csv"
    write_text(target, frame.to_csv(index=False, float_format="%.6g"))
    return target


def plot_summary(frame: pd.DataFrame, title: str):
    """Test accuracy vs rank per method; the original and compressed-only levels as lines."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    ranked = frame[pd.to_numeric(frame["lora_rank"], errors="coerce").notna()]
    original = frame.loc[frame["lora_rank"] == "original", "evaluation"]
    if len(original):
        axes.axhline(original.iloc[0], color="black", linestyle="--", label="original")
    for index, (method, rows) in enumerate(ranked.groupby("quant", sort=False)):
        color = f"C{index}"
        ranks = rows["lora_rank"].astype(int)
        spread = None
        if rows["ci95_low"].notna().any():  # several final seeds: 95% intervals as error bars
            spread = [rows["evaluation"] - rows["ci95_low"], rows["ci95_high"] - rows["evaluation"]]
        axes.errorbar(
            ranks, rows["evaluation"], yerr=spread, marker="o", color=color, capsize=3,
            label=f"{method} + LoRA" + (" (95% CI)" if spread is not None else ""),
        )  # fmt: skip
        if rows["init_only"].notna().any():
            axes.plot(
                ranks,
                rows["init_only"],
                marker=".",
                linestyle=":",
                color=color,
                alpha=0.6,
                label=f"{method} + LoRA init only",
            )
        level = frame.loc[(frame["quant"] == method) & (frame["lora_rank"] == "quantized")]
        if len(level):
            axes.axhline(
                level["evaluation"].iloc[0],
                color=color,
                linestyle="-.",
                alpha=0.6,
                label=f"{method} compressed only",
            )
    if len(ranked):
        axes.set_xscale("log", base=2)
        ticks = sorted(ranked["lora_rank"].astype(int).unique())
        axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.set_xlabel("LoRA rank")
    axes.set_ylabel("test top-1 accuracy (%)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return figure
