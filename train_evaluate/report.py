"""Everything a run writes into its results folder, and nothing else.

Per rank (names as in the original study): ``acc_quant=<m>_r=<r>.png``,
``loss_quant=<m>_r=<r>.png``, ``quant=<m>_r=<r>_optimization_history.html`` and a checkpoint
``checkpoints/quant=<m>_r=<r>.ckpt``. Per run: ``evaluation.csv`` and ``accuracy_vs_rank.png``.
Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure

from compression import LayerAccounting
from train_evaluate.files import atomic_path, write_text

CHECKPOINT_FORMAT = "lora-compression-adapter/1"

# evaluation.csv: the original study's three columns first, then ours (README explains each).
COLUMNS = [
    "quant",
    "lora_rank",
    "evaluation",
    "init",
    "init_only",
    "drop",
    "ratio",
    "ratio_seed",
    "ratio_model",
    "compute_ratio",
    "bits",
    "best_val_acc",
    "best_epoch",
    "optimizer",
    "lr",
    "batch_size",
    "lora_alpha",
    "status",
    "trials_complete",
    "trials_pruned",
    "trials_diverged",
    "compression",
    "bias_counted",
    "seed",
    "seconds",
]
TIMING_COLUMNS = ["seconds"]


def stem(method: str, rank: int) -> str:
    return f"quant={method}_r={rank}"


def checkpoint_path(out: Path, method: str, rank: int) -> Path:
    return out / "checkpoints" / f"{stem(method, rank)}.ckpt"


def save_figure(figure: Figure, target: Path) -> None:
    # Figure objects, not pyplot: no GUI backend, no global state to close.
    with atomic_path(target) as path:
        figure.savefig(path, format="png", dpi=110, bbox_inches="tight")


def plot_epochs(history: dict[str, list[float]], best_epoch: int, metric: str, title: str):
    """Train and val ``metric`` per epoch (0 = the init), the selected epoch marked."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for split in ("train", "val"):
        values = history[f"{split}_{metric}"]
        axes.plot(range(len(values)), values, marker="o", label=split)
    axes.axvline(best_epoch, color="grey", linestyle=":", label=f"selected (epoch {best_epoch})")
    axes.set_xlabel("epoch (0 = init, before training)")
    axes.set_ylabel("top-1 accuracy (%)" if metric == "acc" else "cross-entropy loss")
    axes.set_title(title)
    axes.legend()
    return figure


def write_rank_artifacts(
    out: Path,
    record: dict[str, Any],
    adapter: dict[str, torch.Tensor] | None,
    study: optuna.Study | None,
    checkpoint_meta: dict[str, Any],
) -> None:
    """The per-rank files: curves, Optuna history, checkpoint (whatever the rank produced)."""
    method, rank = record["method"], record["rank"]
    name = stem(method, rank)
    for final in record["finals"][:1]:
        for metric, prefix in (("acc", "acc"), ("loss", "loss")):
            title = f"{'Accuracy' if metric == 'acc' else 'Loss'}, quant={method}, rank={rank}"
            figure = plot_epochs(final["history"], final["best_epoch"], metric, title)
            save_figure(figure, out / f"{prefix}_{name}.png")
    if study is not None and study.get_trials(deepcopy=False):
        html = optuna.visualization.plot_optimization_history(study)
        with atomic_path(out / f"{name}_optimization_history.html") as path:
            # plotly.min.js is written once beside the pages, so they open offline
            html.write_html(path, include_plotlyjs="directory")
    if adapter is not None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            **checkpoint_meta,
            "method": method,
            "rank": rank,
            "init": record["init"],
            "compression": record["compression"],
            "lora_alpha": (record.get("best_params") or {}).get("lora_alpha"),
            "adapter": {k: v.cpu() for k, v in adapter.items()},
            "metrics": {k: v for k, v in record.items() if k not in ("finals",)},
        }
        with atomic_path(checkpoint_path(out, method, rank)) as path:
            torch.save(payload, path)


def accounting_columns(layer: LayerAccounting, model_ratio: float) -> dict[str, Any]:
    return {
        "ratio": layer.ratio,
        "ratio_seed": layer.ratio_seed,
        "ratio_model": model_ratio,
        "compute_ratio": layer.compute_ratio,
        "bits": layer.compressed_bits,
        "bias_counted": layer.include_bias,
    }


def evaluation_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS]


def rank_row(record: dict[str, Any], original_acc: float) -> dict[str, Any]:
    """One evaluation.csv row from a rank's record (accounting added by the caller)."""
    finals = record["finals"]
    params = record.get("best_params") or {}
    test_acc = record["test_acc"]
    return {
        "quant": record["method"],
        "lora_rank": record["rank"],
        "evaluation": test_acc,
        "init": record["init"],
        "init_only": record["init_only"]["test_acc"],
        "drop": None if test_acc is None else original_acc - test_acc,
        "best_val_acc": finals[0]["best_val_acc"] if finals else record["init_only"]["val_acc"],
        "best_epoch": finals[0]["best_epoch"] if finals else 0,
        "optimizer": params.get("optimizer"),
        "lr": params.get("lr"),
        "batch_size": params.get("batch_size"),
        "lora_alpha": params.get("lora_alpha"),
        "status": record["status"],
        "trials_complete": record.get("trials", {}).get("complete"),
        "trials_pruned": record.get("trials", {}).get("pruned"),
        "trials_diverged": record.get("trials", {}).get("diverged"),
        "compression": record["compression"],
        "seed": record["seed"],
        "seconds": round(record["seconds"], 3),
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
        axes.plot(ranks, rows["evaluation"], marker="o", color=color, label=f"{method} + LoRA")
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
