"""Rebuild a shared sweep's report (``evaluation.csv``, the summary plot, ``layers.csv``) from its
Optuna storage alone, on any machine that reaches it.

    python train_evaluate/report.py --storage postgresql://... --out report/
"""

from __future__ import annotations

from pathlib import Path

import optuna

from train_evaluate.outputs.figures import plot_summary, save_figure
from train_evaluate.outputs.report import evaluation_frame, write_evaluation
from train_evaluate.runtime.files import write_text


def rebuild_from_storage(url: str, out: Path, prefix: str = "") -> list[Path]:
    """``evaluation.csv``, ``accuracy_vs_rank.png`` (and ``layers.csv``) of every finished run
    whose report a shared storage holds (``--storage``), written under ``out``: straight into it
    for one run, else one folder per run study. Returns the CSVs written."""
    from train_evaluate.search.storage import RUN_STUDY, stored_reports

    storage = optuna.storages.RDBStorage(url)
    try:
        reports = stored_reports(storage, prefix)
    finally:
        storage.engine.dispose()
    written = []
    for name, attrs in sorted(reports.items()):
        folder = out if len(reports) == 1 else out / name[len(prefix) + len(RUN_STUDY) :]
        frame = evaluation_frame(attrs["evaluation"])
        written.append(write_evaluation(folder, frame))
        save_figure(plot_summary(frame, attrs.get("title", name)), folder / "accuracy_vs_rank.png")
        if "layers_csv" in attrs:
            write_text(folder / "layers.csv", attrs["layers_csv"])
    return written


def main(argv: list[str] | None = None) -> int:
    """``python train_evaluate/report.py --storage URL --out DIR``: a sweep's report from the
    storage alone (many workers), on any machine that reaches it."""
    import argparse
    import sys

    from train_evaluate.search.storage import check_existing_storage, check_storage

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("--storage", required=True, help="the sweep's Optuna storage URL")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--study-prefix", default="", help="the sweep's --study-prefix")
    args = parser.parse_args(argv)
    # the read-only check first: check_storage would create a missing database and its tables
    problem = check_existing_storage(args.storage) or check_storage(args.storage)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    written = rebuild_from_storage(args.storage, args.out, args.study_prefix)
    if not written:
        print(
            f"error: the storage holds no finished sweep with --study-prefix "
            f"{args.study_prefix!r}; a report is stored when a sweep's launcher finishes",
            file=sys.stderr,
        )
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
