"""Every run under a results folder side by side: ``summary.csv`` and one
``summary_<model>_<data>.png`` per (model, data) (``outputs/summary.py`` says how).

    python train_evaluate/compare.py [--results-dir results]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from train_evaluate.config.run_options import DEFAULT_RESULTS
from train_evaluate.outputs.summary import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    written = write_report(args.results_dir)
    if written is None:
        print(
            f"error: no run of this tool (run.json and evaluation.csv) under {args.results_dir}",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {written[0]} and {', '.join(str(p) for p in written[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
