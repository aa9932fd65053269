"""Wall time of the full protocol's adapter training on ImageNet-shaped cached features.

    python benchmarks/bench_full_protocol.py [--methods sparse int1] [--ranks 2 ... 128]

The driver's own sweep (``run_rank``: init-only baseline, an Optuna study with SQLite storage
and median pruning, and the final model) over 40,000 cached features (32,000 train, 8,000 val;
512 features, 1,000 classes; random values, which the cost does not depend on), with the
original protocol: 2 methods x 7 ranks x 10 trials x 10 epochs, the original search space.
The one-off parts the driver also does are included: compression, SVD, base logits. The labels
are the random classifier's own predictions (see ``synthetic_features``), so pruning acts as on
real data; ``--no-pruning`` runs every trial to the end instead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
import torch

from benchmarks.common import machine, synthetic_features
from compression import make_config
from train_evaluate.sweep import Method, SweepConfig, open_storage, run_rank

TARGET_SECONDS = 600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["sparse", "int1"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--init", default="svd_init")
    parser.add_argument(
        "--no-pruning", action="store_true", help="run every trial to its last epoch (a bound)"
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head, splits = synthetic_features(32_000, 8_000)
    head = head.to(device)
    splits = type(splits)(*(s.to(device) for s in (splits.train, splits.val, splits.test)))
    sweep = SweepConfig(
        init=args.init, trials=args.trials, epochs=args.epochs, pruning=not args.no_pruning
    )
    print(f"{len(args.methods)} methods x {len(args.ranks)} ranks x {args.trials} trials x "
          f"{args.epochs} epochs on 40,000 cached features, {args.init}; {machine()}")  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        storage = open_storage(Path(scratch) / "optuna.sqlite3")
        for name in args.methods:
            method = Method.create(name, make_config(name), head, splits.train.features)
            for rank in args.ranks:
                rank_started = time.perf_counter()
                outcome = run_rank(method, rank, splits, sweep, storage, f"{name}_r{rank}")
                trials = outcome.record["trials"]
                print(f"  {name} r={rank:<3d} {time.perf_counter() - rank_started:6.1f} s "
                      f"({trials['complete']} complete, {trials['pruned']} pruned)")  # fmt: skip
    total = time.perf_counter() - started
    print(
        f"full protocol adapter training: {total / 60:.1f} min "
        f"(target {TARGET_SECONDS / 60:.0f} min: {'met' if total <= TARGET_SECONDS else 'missed'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
