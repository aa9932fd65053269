"""Compress a pretrained classifier's final layer, recover it with LoRA, sweep ranks with Optuna.

    python train_evaluate/train_model.py --init svd_init

With an ImageNet folder (one subfolder per synset, default ../archive/imagenet_validation) this
runs the study on a timm model (default resnet18.tv_in1k). Without one it runs the offline demo
on scikit-learn's digits. See README.md for every option and output.

The arguments are parsed before torch, timm and optuna are imported, so ``--help`` and a bad
argument answer at once.
"""

from __future__ import annotations

import logging
import sys
import time

from train_evaluate import interrupt
from train_evaluate.cli import UsageError, build_parser, configure_logging, storage_failure

log = logging.getLogger("train_model")


def load_features(plan):
    """Backbone -> cached features (one pass per image, reused across runs), the split, and
    the weights file (the demo's is trained here, on the train split)."""
    from data import split_indices
    from train_evaluate.demo import demo_weights
    from train_evaluate.features import backbone_features, default_workers

    weights = plan.weights
    if plan.demo:
        # The demo classifier trains on the train split, so the split is drawn first; it is the
        # same split that is drawn below from the (identical) list of readable digits.
        split = split_indices(len(plan.source.ids), plan.fractions, plan.sweep.seed)
        weights = demo_weights(plan.cache_dir, plan.source, split["train"], plan.sweep.seed)
    workers = (
        plan.decode_workers if plan.decode_workers is not None else default_workers(plan.device)
    )
    try:
        found = backbone_features(
            plan.model,
            weights,
            plan.source,
            plan.device,
            plan.cache_dir,
            plan.feature_batch_size,
            workers,
            plan.backbone,
            plan.decode,
        )
        split = split_indices(len(found.cached.ids), plan.fractions, plan.sweep.seed)
    except ValueError as error:  # bad weights; a split emptied by skipped images
        raise UsageError(str(error)) from error
    if found.cached.skipped:
        log.warning("the unreadable images are listed in run.json")
    return found, weights, split


def load_images(plan):
    """Whole-network mode: the model, the decoded uint8 images (cached), the split and the
    weights file. Same split, same demo classifier as ``load_features``."""
    from data import split_indices
    from train_evaluate import network
    from train_evaluate.backbone import BackboneError, create_backbone, eval_transform, weights_id
    from train_evaluate.cut import cut_model
    from train_evaluate.demo import demo_weights
    from train_evaluate.features import (
        BackboneFeatures,
        check_labels,
        default_workers,
        environment,
        feature_key,
    )

    weights, model = plan.weights, plan.backbone
    if plan.demo:
        split = split_indices(len(plan.source.ids), plan.fractions, plan.sweep.seed)
        weights = demo_weights(plan.cache_dir, plan.source, split["train"], plan.sweep.seed)
        model = create_backbone(plan.model, weights, plan.device)
    workers = (
        plan.decode_workers if plan.decode_workers is not None else default_workers(plan.device)
    )
    try:
        num_classes = model.get_classifier().out_features
        check_labels(plan.source, num_classes, plan.model)
        transform = eval_transform(model)
        cached, key, reused = network.cached_images(
            plan.source,
            network.uint8_transform(transform),
            plan.cache_dir,
            num_classes,
            plan.feature_batch_size,
            workers,
        )
        split = split_indices(len(cached.ids), plan.fractions, plan.sweep.seed)
    except (ValueError, BackboneError) as error:
        raise UsageError(str(error)) from error
    if cached.skipped:
        log.warning("%d unreadable images were skipped; they are listed in run.json",
                    len(cached.skipped))  # fmt: skip
    mean, std = network.normalisation(transform)
    wrapped = network.ImageModel(model, mean, std).to(plan.device).eval().requires_grad_(False)
    found = plan.network.cut
    if found is not None:
        # the prefix before the cut is never compressed: its output is cached once, and every
        # step, calibration pass and evaluation runs from there on
        states_key = feature_key(
            images=key,
            model=plan.model,
            weights=weights_id(plan.model, weights),
            environment=environment(plan.device),
            cut=found.module,
        )
        cached, reused = network.cached_states(
            cached, wrapped, found, plan.cache_dir, states_key, num_classes,
            plan.feature_batch_size,
        )  # fmt: skip
        key = states_key
        suffix = cut_model(model, found, plan.network.input_size)
        wrapped = network.StateModel(suffix, mean, std, found.state_shape).to(plan.device)
        wrapped.eval().requires_grad_(False)
    # what the studies and records depend on besides the pixels: the model, its weights, the
    # selected layers and the calibration set's size
    identity = feature_key(
        images=key,
        model=plan.model,
        weights=weights_id(plan.model, weights),
        environment=environment(plan.device),
        layers=list(plan.network.layers),
        calib_images=plan.network.calib_images,
    )
    return BackboneFeatures(wrapped, identity, cached, reused), weights, split


def run(plan) -> None:
    import torch

    from train_evaluate import run_folder
    from train_evaluate.backbone import weights_id
    from train_evaluate.files import remove_orphan_temporaries
    from train_evaluate.plan import announce

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
            run_folder.claim(plan.out, config, plan.overwrite)
        # Temporary files of killed runs (up to the feature cache's size); live writers' stay.
        removed = remove_orphan_temporaries(plan.out) + remove_orphan_temporaries(plan.cache_dir)
        if removed:
            log.info("removed %d temporary files left by killed runs", removed)
        announce(plan)
        started = []
        if plan.workers > 1:
            from train_evaluate import workers

            # the caches (and the demo classifier) once, before the workers read them
            load_images(plan) if plan.network is not None else load_features(plan)
            started = workers.spawn(worker_argv(plan), plan.workers - 1, plan.out)
            torch.set_num_threads(plan.worker_threads)  # the launcher sweeps as one of them
        try:
            results = sweep_all(plan)
        except BaseException:
            for process, _ in started:
                process.terminate()
            raise
        finally:
            for problem in workers.wait(started) if started else []:
                log.warning("warning: %s", problem)
        if plan.shared:
            results["determinism"] = SHARED_DETERMINISM[plan.share]
        with run_folder.writing(plan.out):
            run_folder.finish(plan.out, config, results)


SHARED_DETERMINISM = {
    "trials": "several workers (or a shared --storage): the same ranks and the same number of "
    "trials per rank as one worker; TPE's suggestions after its random start-up trials depend "
    "on the order in which trials finished, so parameters and values may differ from a "
    "one-worker run",
    "ranks": "several workers (or a shared --storage), each rank one worker's: on a CPU its "
    "trials are drawn, trained and pruned as one process does it, so with the same --threads "
    "the studies are a one-process run's (other thread counts sum in another order, and a "
    "flipped val count changes TPE's later draws), unless a worker died mid-rank and another "
    "took the rank over; on CUDA one process batches its trials, which TPE draws differently",
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


def sweep_all(plan) -> dict:
    """Features, every method and rank, the report; returns run.json's results."""
    import hashlib

    import optuna
    import timm
    import torch

    from data import split_lists, split_warnings
    from lora.rounding import ADAPTER_INT_BITS
    from train_evaluate import compare, network, pareto, report, run_folder
    from train_evaluate.backbone import classifier, tensor_bits, weights_id
    from train_evaluate.checkpoint import ADAPTER_DTYPES
    from train_evaluate.files import write_text
    from train_evaluate.progress import Progress
    from train_evaluate.records import RunContext, rank_record
    from train_evaluate.sweep import Method, Sharing, Splits, open_storage, steps_per_rank
    from train_evaluate.training import evaluate, split_tensors
    from train_evaluate.workers import shared_storage

    started = time.perf_counter()
    whole = plan.network is not None
    found, weights, split = load_images(plan) if whole else load_features(plan)
    cached, out = found.cached, plan.out
    for warning in split_warnings(cached.labels, split):
        log.warning("warning: %s", warning)
    lists = split_lists(cached.ids, split)
    with run_folder.writing(out):
        for name, text in lists.items() if plan.worker_of is None else ():  # its launcher's
            write_text(out / "split" / f"{name}.txt", text)
    # the module the study compresses: the classifier on features, or the whole network on
    # the cached images
    head = found.model if whole else classifier(found.model)
    parts = split_tensors(
        cached.features, cached.labels, split, plan.sweep.objective, head, plan.device
    )
    splits = Splits(parts["train"], parts["val"], parts["test"])
    original = evaluate(head, splits.test)
    original_acc = original["acc"]
    log.info(
        "original classifier: test top-1 %.2f%% (%d test images)", original_acc, len(splits.test)
    )
    # int8 / int4 adapters: codes and fp32 row scales; float ones at their dtype
    code_bits = ADAPTER_INT_BITS.get(plan.adapter_dtype, 0)
    adapter_bits = 32 if code_bits else ADAPTER_DTYPES[plan.adapter_dtype].itemsize * 8
    if whole:
        setup = network.NetworkSetup.create(plan, head, splits.train, adapter_bits, code_bits)
    else:
        accounting = report.Accounting(
            plan.fc_shape,
            adapter_bits,
            plan.sweep.use_dora,
            plan.include_bias,
            tensor_bits(found.model) - tensor_bits(head),
            code_bits,
        )
    if plan.search == "pareto":
        total = plan.sweep.trials
    else:
        total = len(plan.compressions) * len(plan.ranks) * steps_per_rank(plan.sweep)
    rows, layer_rows, candidates, built, records = [], [], {}, [], {}
    if plan.shared:
        storage = shared_storage(plan.storage or f"sqlite:///{(out / 'optuna.sqlite3').resolve()}",
                                 plan.heartbeat)  # fmt: skip
    else:
        storage = open_storage(out / "optuna.sqlite3")
    with Progress(total) as progress:
        context = RunContext(
            plan,
            head,
            splits,
            original_acc,
            found.key,
            weights_id(plan.model, weights),
            hashlib.sha256(lists["test"].encode()).hexdigest(),
            storage,
            progress,
            Sharing(storage, plan.heartbeat, plan.share == "ranks") if plan.shared else None,
        )
        for name, compression in plan.compressions.items():
            if whole:
                method = setup.method(name, compression)
                accounting = setup.accounting(method)
                compressed = evaluate(method.compressed_model(), splits.test)
            else:
                method = Method.create(name, compression, head, splits.train.features)
                compressed = evaluate(method.compressed_linear(), splits.test)
            log.info(
                "%s: compressed only, test top-1 %.2f%%", compression.describe(), compressed["acc"]
            )
            if plan.search == "pareto":
                candidates[name] = pareto.Candidate(method, accounting, compressed["acc"])
                rows += report.method_rows(
                    {"quant": name, "init": plan.sweep.init, "seed": plan.sweep.seed,
                     "compression": compression.describe()},
                    original, compressed, method.cost, [], accounting,
                )  # fmt: skip
                continue
            shared = {
                "quant": name,
                "init": plan.sweep.init,
                "seed": plan.sweep.seed,
                "compression": compression.describe(),
            }
            built.append((method, shared, compressed, accounting))
            if context.sharing is None:  # one process: rank after rank, as they come
                records[name] = [rank_record(context, method, rank) for rank in plan.ranks]
        if context.sharing is not None:
            records = share_ranks(context, [method for method, *_ in built], plan.ranks)
        for method, shared, compressed, accounting in built:
            rows += report.method_rows(
                shared, original, compressed, method.cost, records[method.name], accounting
            )
            if whole:
                layer_rows += [
                    row for r in plan.ranks for row in accounting.layer_rows(method.name, r)
                ]
        if candidates:
            pareto_search(plan, context, candidates, found, out)
    if plan.worker_of is not None:
        return {}  # a worker: the launcher writes the report
    frame = report.evaluation_frame(rows)
    # launchers sharing one folder write its report one at a time
    with run_folder.writing(out):
        csv_path = report.write_evaluation(out, frame)
        if whole:
            write_text(out / "layers.csv", network.layers_csv(layer_rows))
        report.repair_plotly_bundle(out)
        title = f"{plan.model}, {plan.sweep.init}" + (" (digits demo)" if plan.demo else "")
        report.save_figure(report.plot_summary(frame, title), out / "accuracy_vs_rank.png")
        if plan.shared:
            # the report's rows in the storage too: report.py --storage rebuilds them anywhere
            from train_evaluate import run_folder, workers

            identity = weights_id(plan.model, plan.weights) if not plan.demo else "demo"
            workers.store_report(
                storage, plan.study_prefix, run_folder.run_config(plan, identity), frame, title,
                network.layers_csv(layer_rows) if whole else None,
            )  # fmt: skip
        comparison = compare.write_report(plan.results_dir)
        log.info(
            "\n%s",
            frame[
                ["quant", "lora_rank", "evaluation", "init_only", "ratio", "ratio_seed"]
            ].to_string(index=False, float_format="{:.2f}".format),
        )
        log.info("wrote %s and the plots, checkpoints and Optuna pages beside it", csv_path)
        if comparison:
            log.info("comparison of every run in %s: %s", plan.results_dir, comparison[0])
        if plan.demo:
            log.info(
                "(these are demo numbers on digits, not ImageNet; see README for the real study)"
            )
        return {
            "data": plan.source.description,
            "data_dir": None if plan.demo else str(plan.source.root.resolve()),
            "weights_file": str(weights.resolve()) if weights else None,
            "feature_key": found.key,
            "features_from_cache": found.reused,
            "images": len(cached.ids),
            "skipped_images": len(cached.skipped),
            "skipped_image_ids": list(cached.skipped),
            "split_sizes": {n: len(split[n]) for n in split},
            "versions": {
                "torch": torch.__version__,
                "timm": timm.__version__,
                "optuna": optuna.__version__,
            },
            "seconds": time.perf_counter() - started,
        }


def share_ranks(context, methods, ranks) -> dict[str, list]:
    """Many workers: every (method, rank) until each has its record, working wherever there is
    a free trial or a final to claim, waiting only when there is none anywhere. Whole ranks
    (``--share ranks``) are taken largest first: the longest come first and the short ones
    fill in at the end, when a worker would otherwise wait on another's last rank."""
    from train_evaluate import workers
    from train_evaluate.records import rank_record

    records = {method.name: [None] * len(ranks) for method in methods}
    pending = [(method, index) for method in methods for index in range(len(ranks))]
    if context.sharing.whole_ranks:
        pending.sort(key=lambda job: -ranks[job[1]])
    while pending:
        waiting = []
        for method, index in pending:
            record = rank_record(context, method, ranks[index])
            if record is None:
                waiting.append((method, index))
            else:
                records[method.name][index] = record
        if len(waiting) == len(pending):
            workers.idle()
        pending = waiting
    return records


def pareto_search(plan, context, candidates, found, out) -> None:
    """``--search pareto``: the study, the front's final models and pareto.csv."""
    from lora.rounding import ADAPTER_INT_BITS, round_adapter_
    from train_evaluate import pareto, report
    from train_evaluate.checkpoint import read_packed, write_packed
    from train_evaluate.records import checkpoint_info
    from train_evaluate.sweep import train_one

    sweep, splits = plan.sweep, context.splits
    context.progress.label = "pareto search"
    study = pareto.run_search(
        candidates, list(plan.ranks), splits, sweep, context.storage, train_one,
        context.progress.step,
    )  # fmt: skip
    chosen = pareto.front(study, sweep.trials)
    info = checkpoint_info(context)
    bits = ADAPTER_INT_BITS.get(plan.adapter_dtype)

    def write(path, layer, metrics):
        extra = {**info, "init": sweep.init, "metrics": metrics}
        return write_packed(path, layer, plan.adapter_dtype, extra)

    def read(path):
        if plan.network is None:
            return read_packed(path, plan.device).layer
        from train_evaluate.network import load_adapted

        return load_adapted(found.model, path, plan.device)

    rows = pareto.final_rows(
        chosen, candidates, splits, sweep, train_one, out, write, read,
        (lambda layer: round_adapter_(layer, bits)) if bits else (lambda layer: None),
    )  # fmt: skip
    title = report.run_title(info, sweep.init)
    frame = pareto.write_outputs(out, study, rows, candidates, context.original_acc, title)
    log.info(
        "pareto search: %d trials, %d on the front (val top-1 against bits):\n%s",
        sweep.trials,
        len(frame),
        frame[["trial", "quant", "lora_rank", "val_acc", "bits_per_weight", "test_acc"]].to_string(
            index=False, float_format="{:.2f}".format
        ),
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        with interrupt.deferred():
            args = build_parser().parse_args(argv)
            args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
            import optuna

            from train_evaluate.plan import plan_run

            # Optuna logs a trial's exception with its traceback; ours are reported in one line
            # (Ctrl-C) or propagate (bugs), so its own log stays quiet.
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            run(plan_run(args))
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
