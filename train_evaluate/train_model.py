"""Compress a pretrained classifier (its FC, or the layers ``--layers`` selects), recover it
with LoRA adapters, sweep ranks with Optuna.

    python train_evaluate/train_model.py --init svd_init

With an ImageNet folder (one subfolder per synset, default ../archive/imagenet_validation,
relative to the working directory) this runs the study on a timm model (default
resnet18.tv_in1k). Without one it runs the offline demo on scikit-learn's digits. Every option
is in docs/options.md; what a run writes, in docs/outputs.md.

The arguments are parsed before torch, timm and optuna are imported, so ``--help`` and a bad
argument answer at once.
"""

from __future__ import annotations

import logging
import sys

from train_evaluate.config.cli import UsageError, configure_logging, storage_failure
from train_evaluate.config.options import parse_args
from train_evaluate.runtime import interrupt

log = logging.getLogger("train_model")


def run(plan) -> None:
    """One run, in order: hold the run folder and check its configuration, clear what killed
    runs left, say what will be done, start the workers (``--workers N``), sweep every method
    and rank (``search/sweep_all.py``), and record the results in run.json."""
    import torch

    from train_evaluate.config.announce import announce
    from train_evaluate.inputs.backbone import weights_id
    from train_evaluate.outputs import run_folder
    from train_evaluate.search.sweep_all import sweep_all

    torch.set_num_threads(plan.threads)
    identity = weights_id(plan.model, plan.weights) if not plan.demo else "demo"
    config = run_folder.run_config(plan, identity)
    if plan.worker_of is not None:
        # a worker started by a launcher (--workers N), which holds the folder, built the
        # caches and writes the report
        sweep_all(plan)
        return
    with run_folder.exclusive(plan.out, plan.shared):
        with run_folder.writing(plan.out):
            run_folder.claim(plan.out, config, plan.overwrite, plan.options)
        remove_leftovers(plan)
        announce(plan)
        started = start_workers(plan)
        try:
            results = sweep_all(plan)
        except BaseException:
            for process, _ in started:
                process.terminate()
            raise
        finally:
            wait_for_workers(started)
        if plan.shared:
            results["determinism"] = SHARED_DETERMINISM[plan.share]
        with run_folder.writing(plan.out):
            run_folder.finish(plan.out, config, results)


def remove_leftovers(plan) -> None:
    """Temporary files of killed runs (up to the feature cache's size); live writers' stay."""
    from train_evaluate.runtime.files import remove_orphan_temporaries

    removed = remove_orphan_temporaries(plan.out) + remove_orphan_temporaries(plan.cache_dir)
    if removed:
        log.info("removed %d temporary files left by killed runs", removed)


def start_workers(plan) -> list:
    """``--workers N``: build the caches (and the demo classifier) once, before the workers
    read them, then start N - 1 workers; this process sweeps as the N-th, on its share of the
    cores. Returns the started (process, log) pairs."""
    if plan.workers <= 1:
        return []
    import torch

    from train_evaluate.search import workers
    from train_evaluate.training.loading import load_features, load_images

    load_images(plan) if plan.network is not None else load_features(plan)
    started = workers.spawn(worker_argv(plan), plan.workers - 1, plan.out)
    torch.set_num_threads(plan.worker_threads)
    return started


def wait_for_workers(started: list) -> None:
    if not started:
        return
    from train_evaluate.search import workers

    for problem in workers.wait(started):
        log.warning("warning: %s", problem)


SHARED_DETERMINISM = {
    "trials": "several workers (or a shared --storage): the same ranks and the same number of "
    "trials per rank as one worker, one per slot; a killed worker's trial runs again once, at "
    "its own slot with its seed and the parameters it had drawn, but maybe after trials asked "
    "later; TPE's suggestions after its random start-up trials and the pruner's decisions "
    "depend on the order in which trials finished, so parameters and values may differ from a "
    "one-worker run",
    "ranks": "several workers (or a shared --storage), each rank one worker's: on a CPU its "
    "trials are drawn, trained and pruned as one process does it, so with the same --threads "
    "the studies are a one-process run's (other thread counts sum in another order, and a "
    "flipped val count changes TPE's later draws), also when a worker died mid-rank and "
    "another took the rank over (the dead worker's running trials are asked again at their "
    "slots, as a one-process resume does); on CUDA one process batches its trials, which TPE "
    "draws differently",
}


def worker_argv(plan) -> list[str]:
    """The launcher's own arguments for its workers: one process each, no --overwrite (the
    launcher has already cleared the folder), and each worker's share of the cores as their
    --threads (last, so it overrides a --threads of the command, which it then equals)."""
    argv, skip = [], False
    for argument in plan.argv:
        if skip:
            skip = False
            continue
        if argument == "--workers":
            skip = True
            continue
        if argument.startswith("--workers=") or argument == "--overwrite":
            continue
        argv.append(argument)
    return [*argv, "--threads", str(plan.worker_threads), "--workers", "1"]


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        with interrupt.deferred():
            options = parse_args(argv)
            given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
            import optuna

            from train_evaluate.config.plan import plan_run

            # Optuna logs a trial's exception with its traceback; ours are reported in one line
            # (Ctrl-C) or propagate (bugs), so its own log stays quiet.
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            run(plan_run(options, given))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished trials and ranks are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        line = storage_failure(error)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
