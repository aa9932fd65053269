"""Wall time of the full protocol's adapter training on ImageNet-shaped cached features: today's
loop (one ``train_adapter`` per trial, autograd) against the hand-written engine (the same
sequential study, each run on ``batched``'s engine: the CPU's default) and the batched path
(trials trained together: CUDA's default), in one run, as ratios.

    python -m benchmarks.bench_full_protocol [--methods sparse int1] [--ranks 2 ... 128]
        [--rows 32000] [--val 8000] [--trials 10] [--epochs 10] [--repeats 5]
        [--variants loop engine engine-workers] [--workers 2] [--device auto]

The driver's own sweep (``run_rank``: init-only baseline, an Optuna study with SQLite storage
and median pruning, and the final model) over cached features (default 32,000 train and 8,000
val rows; 512 features, 1,000 classes; random values, which the cost does not depend on), with
the original protocol: 2 methods x 7 ranks x 10 trials x 10 epochs, the original search space.
The one-off parts the driver also does are included: compression, SVD, base logits. The labels
are the random classifier's own predictions (see ``synthetic_features``), so pruning acts as on
real data. Each variant's figure is the median of ``--repeats`` interleaved repetitions with its
min and max; smaller ``--rows`` / ``--ranks`` / ``--epochs`` give a scaled-down protocol (the
header line says which was run).

``engine-workers`` is the driver's ``--workers N --share ranks`` on one machine: this process
and N - 1 started ones (each building the same features, as a driver's worker reads the cache)
share one SQLite storage, each rank taken whole by one of them, largest first, on the engine,
and the machine's threads divided among them. Its studies are the engine's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import statistics
import tempfile
import warnings
from pathlib import Path

import optuna
import torch

from benchmarks.common import REPEATS, interleaved, machine, ratio_line, synthetic_features
from compression import make_config
from train_evaluate.search import sweep
from train_evaluate.search.storage import open_storage, shared_storage
from train_evaluate.training import batched, fc_method

# seconds: CPU, half the loop's earlier 9.0 min (the ratio against the loop is printed too);
# GPU, one minute for the whole protocol
TARGET_SECONDS = {"cpu": 270, "cuda": 60}
HEARTBEAT = 10  # seconds, the driver's default


Ranks = dict[tuple[str, int], tuple[float, int]]


def sweep_config(args) -> sweep.SweepConfig:
    return sweep.SweepConfig(
        init=args.init, trials=args.trials, epochs=args.epochs, pruning=not args.no_pruning
    )


def protocol(args, head, splits, device) -> Ranks:
    """One whole protocol: every method and rank, in a fresh Optuna storage. Returns each
    (method, rank)'s seconds and the epochs its trials and final model trained."""
    config = sweep_config(args)
    ranks: Ranks = {}
    with tempfile.TemporaryDirectory() as scratch:
        storage = open_storage(Path(scratch) / "optuna.sqlite3")
        for name in args.methods:
            method = fc_method.Method.create(name, make_config(name), head, splits.train.features)
            for rank in args.ranks:
                outcome = sweep.run_rank(method, rank, splits, config, storage, f"{name}_r{rank}")
                ranks[name, rank] = (outcome.record["seconds"], epochs_of(outcome))
    return ranks


def epochs_of(outcome: sweep.RankOutcome) -> int:
    """The epochs a rank's trials and final models recorded."""
    trials = outcome.study.trials if outcome.study is not None else []  # --epochs 0
    epochs = sum(max(len(t.intermediate_values) - 1, 0) for t in trials)
    return epochs + sum(len(f["history"]["val_acc"]) - 1 for f in outcome.record["finals"])


def whole_ranks(args, head, splits, url: str) -> Ranks:
    """One worker of ``engine-workers``: every rank no other worker has taken, largest first,
    as the driver's ``share_ranks`` walks them."""
    with warnings.catch_warnings():
        # the heartbeat options' "experimental" notes, and the claims' asks outside optimize
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return _whole_ranks(args, head, splits, url)


def _whole_ranks(args, head, splits, url: str) -> Ranks:
    config = sweep_config(args)
    storage = shared_storage(url, HEARTBEAT)
    sharing = sweep.Sharing(storage, HEARTBEAT, whole_ranks=True)
    methods = {
        name: fc_method.Method.create(name, make_config(name), head, splits.train.features)
        for name in args.methods
    }
    ranks: Ranks = {}
    for rank in sorted(args.ranks, reverse=True):
        for name in args.methods:
            study = f"{name}_r{rank}"
            outcome = sweep.run_rank(methods[name], rank, splits, config, storage, study,
                                     sharing=sharing)  # fmt: skip
            if outcome is not None:  # None: another worker's rank
                outcome.claim.release(True)
                ranks[name, rank] = (outcome.record["seconds"], epochs_of(outcome))
    storage.engine.dispose()
    return ranks


def started_worker(args, url: str, threads: int, results) -> None:
    """The entry point of a started worker: the same features, built here, then its ranks;
    what it found, or the error that stopped it, goes back through ``results``."""
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        head, splits = synthetic_features(args.rows, args.val)
        results.put(whole_ranks(args, head, splits, url))
    except BaseException as error:
        results.put(RuntimeError(f"a started worker failed: {error!r}"))
        raise


def result_of(results, others: list) -> Ranks:
    """The next started worker's ranks. Each puts once, its ranks or the error that stopped
    it; one that died before it could (killed, or failing to start) ends the wait too."""
    while True:
        try:
            found = results.get(timeout=5)
        except queue.Empty:
            dead = [p.exitcode for p in others if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"a started worker died (exit code {dead[0]})") from None
            continue
        if isinstance(found, BaseException):
            raise SystemExit(str(found))
        return found


def worker_threads(args) -> int:
    """Each engine-workers process's share of this process's threads."""
    return max(1, torch.get_num_threads() // args.workers)


def protocol_with_workers(args, head, splits) -> Ranks:
    """One whole protocol on ``args.workers`` processes sharing one storage (this one too)."""
    threads, share = torch.get_num_threads(), worker_threads(args)
    context = multiprocessing.get_context("spawn")  # not fork: torch's thread pools
    results = context.Queue()
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'optuna.sqlite3'}"
        open_storage(Path(scratch) / "optuna.sqlite3").engine.dispose()  # tables, WAL
        others = [
            context.Process(target=started_worker, args=(args, url, share, results))
            for _ in range(args.workers - 1)
        ]
        for process in others:
            process.start()
        try:
            torch.set_num_threads(share)
            ranks = whole_ranks(args, head, splits, url)
            for _ in others:
                ranks.update(result_of(results, others))
        except BaseException:
            for process in others:
                process.terminate()
            raise
        finally:
            torch.set_num_threads(threads)
            for process in others:
                process.join()
    return ranks


def variant(name: str, args, head, splits, device, seen: dict[str, list[Ranks]]):
    def run() -> None:
        sweep.BATCHED = name.startswith("batched")
        sweep.ENGINE = name != "loop"
        batched.CUDA_GRAPHS = name != "batched-nographs"
        try:
            if name == "engine-workers":
                seen.setdefault(name, []).append(protocol_with_workers(args, head, splits))
            else:
                seen.setdefault(name, []).append(protocol(args, head, splits, device))
        finally:
            sweep.BATCHED, sweep.ENGINE, batched.CUDA_GRAPHS = None, True, True

    return run


def rank_table(seen: dict[str, list[Ranks]]) -> str:
    """Per (method, rank): each variant's median seconds over the repetitions and the epochs
    its study recorded (median too). The studies of two variants can part ways when a float
    rounding flips one val count (then TPE asks other trials), which shows here as other
    epochs. A batched trial that the pruner stops trains on to its last epoch unrecorded."""
    names = list(seen)
    lines = ["per rank: median seconds (median epochs recorded) over the repetitions"]
    lines.append("  " + " | ".join(["method rank", *names]))
    for key in seen[names[0]][0]:
        cells = []
        for name in names:
            seconds = statistics.median(reps[key][0] for reps in seen[name])
            epochs = statistics.median(reps[key][1] for reps in seen[name])
            cells.append(f"{seconds:.1f} s ({epochs:g})")
        lines.append(f"  {key[0]} r={key[1]} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["sparse", "int1"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--rows", type=int, default=32_000, help="train rows (val: --val)")
    parser.add_argument("--val", type=int, default=8_000)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--init", default="svd_init")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=["loop", "engine", "engine-workers", "batched", "batched-nographs"],
        help="loop: today's train_adapter per trial; engine: each run alone on the "
        "hand-written engine, the study unchanged (the CPU's default); engine-workers: the "
        "engine on --workers processes, each rank one worker's (--share ranks); batched: "
        "trials trained together (CUDA graphs on CUDA; CUDA's default); batched-nographs: the "
        "batched path without CUDA graphs (default: loop engine, and engine-workers on a CPU)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="processes of engine-workers (default 2)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)"
    )
    parser.add_argument(
        "--no-pruning", action="store_true", help="run every trial to its last epoch (a bound)"
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if args.variants is None:
        args.variants = ["loop", "engine"] + (["engine-workers"] if name == "cpu" else [])
    if "engine-workers" in args.variants and name != "cpu":
        parser.error("engine-workers runs on the CPU (its started workers build CPU features)")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1; got {args.workers}")
    head, splits = synthetic_features(args.rows, args.val)
    head = head.to(device)
    splits = type(splits)(*(s.to(device) for s in (splits.train, splits.val, splits.test)))
    full = (
        args.rows == 32_000 and args.val == 8_000 and len(args.methods) == 2
        and len(args.ranks) == 7 and args.trials == 10 and args.epochs == 10
    )  # fmt: skip
    print(
        f"{'full' if full else 'SCALED-DOWN'} protocol: {len(args.methods)} methods x "
        f"{len(args.ranks)} ranks {args.ranks} x {args.trials} trials x {args.epochs} epochs on "
        f"{args.rows:,} + {args.val:,} cached features, {args.init}, {device.type}; {machine()}"
    )
    seen: dict[str, list[Ranks]] = {}
    timings = interleaved(
        {v: variant(v, args, head, splits, device, seen) for v in args.variants},
        args.repeats,
        warmup=False,  # a whole protocol per call: its one-off costs are part of the figure
    )
    print(rank_table(seen))
    for timing in timings.values():
        print(timing.line())
    if "engine-workers" in timings:
        count = worker_threads(args)
        print(f"engine-workers: {args.workers} processes of {count} thread(s) each")
    target = TARGET_SECONDS[device.type]
    for timing in timings.values():
        if full:
            met = "met" if timing.median <= target else "missed"
            print(f"{timing.name}: target {target} s on {device.type} {met}")
    if "loop" in timings:
        for other in timings.values():
            if other.name != "loop":
                print(ratio_line(timings["loop"], other))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
