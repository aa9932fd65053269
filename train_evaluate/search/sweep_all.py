"""What a run does once its folder is held: every (method, rank), then the report.

``sweep_all(plan)``, in order:

1. the inputs, loaded once (cached features, or the whole network's cached images), and the
   split's image ids written to ``split/``;
2. the original classifier scored on the test split;
3. per method: the compressed model (FC or whole network) and its accounting, scored
   compressed only; then each rank's record (trials and final models, ``records``), in this
   process or shared with other workers (``share_ranks``); or, with ``--search pareto``, one
   study over every method and rank (``pareto_search``);
4. ``evaluation.csv``, the plots, ``layers.csv``, the summary of every run in ``--results-dir``.

It returns run.json's results. A worker started by a launcher stops after step 3: the launcher
writes the report.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from train_evaluate.training.target import Target

log = logging.getLogger("train_model")


@dataclass
class Built:
    """One method, compressed and scored, ready for its ranks."""

    method: Target  # fc_method.Method, or network.NetworkMethod in whole-network mode
    shared: dict[str, Any]  # the columns every row of the method carries
    compressed: dict[str, float]  # the compressed-only model's test metrics
    accounting: Any  # outputs.accounting.Accounting: the classifier's, or the network's
    budget: Any = None  # --bits-budget: the solved budget.Budget of this method
    rank: int | None = None  # --bits-budget: the one rank its rows name (the largest chosen)


def sweep_all(plan) -> dict:
    """Inputs, every method and rank, the report; returns run.json's results."""
    from train_evaluate.inputs.backbone import classifier, weights_id
    from train_evaluate.runtime.progress import Progress
    from train_evaluate.search.records import RunContext
    from train_evaluate.search.sweep import Sharing
    from train_evaluate.training.loading import load_features, load_images
    from train_evaluate.training.training import evaluate

    started = time.perf_counter()
    whole = plan.network is not None
    found, weights, split = load_images(plan) if whole else load_features(plan)
    lists = write_split(plan, found.cached, split)
    # the module the study compresses: the classifier on features, or the whole network on
    # the cached images
    head = found.model if whole else classifier(found.model)
    splits = training_splits(plan, found.cached, split, head)
    original = evaluate(head, splits.test)
    log.info(
        "original classifier: test top-1 %.2f%% (%d test images)", original["acc"], len(splits.test)
    )
    build = method_builder(plan, found, head, splits)
    storage = run_storage(plan)
    with Progress(total_steps(plan)) as progress:
        context = RunContext(
            plan,
            head,
            splits,
            original["acc"],
            found.key,
            weights_id(plan.model, weights),
            hashlib.sha256(lists["test"].encode()).hexdigest(),
            storage,
            progress,
            Sharing(storage, plan.heartbeat, plan.share == "ranks") if plan.shared else None,
        )
        rows, layer_rows = sweep_methods(plan, context, build, original)
    if plan.worker_of is not None:
        return {}  # a worker: the launcher writes the report
    write_report(plan, storage, rows, layer_rows)
    return run_results(plan, found, weights, split, started)


def write_split(plan, cached, split) -> dict[str, str]:
    """The split's image ids, one file per split (by the launcher only); returns their text."""
    from data import split_lists, split_warnings
    from train_evaluate.outputs import run_folder
    from train_evaluate.runtime.files import write_text

    for warning in split_warnings(cached.labels, split):
        log.warning("warning: %s", warning)
    lists = split_lists(cached.ids, split)
    with run_folder.writing(plan.out):
        for name, text in lists.items() if plan.worker_of is None else ():  # its launcher's
            write_text(plan.out / "split" / f"{name}.txt", text)
    return lists


def training_splits(plan, cached, split, head):
    """Train / val / test rows on the device, with the frozen base's logits where needed."""
    from train_evaluate.training.training import Splits, split_tensors

    parts = split_tensors(
        cached.features, cached.labels, split, plan.sweep.objective, head, plan.device
    )
    return Splits(parts["train"], parts["val"], parts["test"])


def method_builder(plan, found, head, splits) -> Callable[[str, Any], Built]:
    """``build(name, compression)``: the method compressed, its accounting, and its
    compressed-only test metrics; the FC study and the whole network alike."""
    from lora.attach import classifier_name
    from train_evaluate.inputs.backbone import bits_outside, layer_weights
    from train_evaluate.inputs.selection import LayerInfo
    from train_evaluate.outputs.accounting import Accounting
    from train_evaluate.training import network
    from train_evaluate.training.fc_method import Method
    from train_evaluate.training.training import evaluate

    shared_columns = lambda name, compression: {  # noqa: E731
        "quant": name,
        "init": plan.sweep.init,
        "seed": plan.sweep.seed,
        "compression": compression.describe(),
    }
    if plan.network is not None:
        setup = network.NetworkSetup.create(plan, head, splits.train, plan.adapter_dtype)

        measured: list = []  # --bits-budget: the options, measured for the first budget

        def build(name: str, compression: Any, bits_budget: float | None = None) -> Built:
            budget, layer_plan = None, plan.network.layer_plan
            if bits_budget is not None:
                budget = solve_budget(plan, setup, bits_budget, measured, found.key)
                layer_plan = budget.layer_plan(name, plan.adapter_dtype)
            if compression is None:  # a plan: each layer its own method and rank
                method = setup.planned_method(layer_plan, plan.compressions)
                compression = method.config
            else:
                method = setup.method(name, compression)
            # in one process the rank's row runs next and reuses what its quantized row
            # computes; workers compute their own, and a Pareto search builds other ranks
            shares = not plan.shared and plan.search != "pareto"
            compressed = evaluate(
                method.compressed_model(plan.sweep if shares else None), splits.test
            )
            rank = None if method.plan is None else method.plan.rank
            return Built(method, shared_columns(name, compression), compressed,
                         setup.accounting(method), budget, rank)  # fmt: skip

        return build
    module = classifier_name(found.model)
    # the FC study prices its rows as a network run of one layer, the classifier
    template = Accounting(
        (LayerInfo.of(module, head),),
        (),
        plan.adapter_dtype,
        plan.sweep.use_dora,
        plan.include_bias,
        bits_outside(found.model, [module]),
        "head (1 layer)",
        layer_weights(found.model),
    )

    def build(name: str, compression: Any) -> Built:
        method = Method.create(name, compression, head, splits.train.features, module, fit=plan.fit)
        compressed = evaluate(method.compressed_model(), splits.test)
        accounting = replace(template, costs=(method.cost,))
        return Built(method, shared_columns(name, compression), compressed, accounting)

    return build


def solve_budget(plan, setup, bits_budget: float, measured: list, features_key: str):
    """--bits-budget: every layer's options measured (once per run: ``measured`` keeps them for
    the run's other budgets; the run folder keeps them layer by layer, for a run that resumes),
    the knapsack solved, the choice logged."""
    from tqdm import tqdm

    from compression.budget import BudgetError, SensitivityError
    from train_evaluate.runtime.errors import UsageError
    from train_evaluate.training import budget, budget_store

    sensitivity = plan.network.budget_sensitivity
    if not measured:
        started = time.perf_counter()
        pricing, label = setup, sensitivity
        if sensitivity == "kl-reconstructed":  # options priced after --budget-sensitivity-steps
            pricing = replace(setup, reconstruction=plan.network.sensitivity_reconstruction)
            label += f" after {pricing.reconstruction.block_steps} block steps"
        path = plan.out / budget_store.FILE
        prices = budget.shape_prices(setup.template, plan.compressions, plan.ranks)
        key = budget_store.measurement_key(plan, features_key, prices)
        kept = lambda layers: budget_store.write_measured(path, key, layers)  # noqa: E731
        with tqdm(total=len(setup.layers), desc="bit budget: sensitivities", disable=None) as bar:
            measured.append(budget.measure_options(
                pricing, plan.compressions, plan.ranks, plan.sweep, bar.update, sensitivity,
                budget_store.read_measured(path, key), kept,
            ))  # fmt: skip
        log.info(
            "bit budget: %d layers x %d options each at most, sensitivities (%s) measured in "
            "%.1f s", len(setup.layers), max(map(len, measured[0])), label,
            time.perf_counter() - started,
        )  # fmt: skip
    started = time.perf_counter()
    try:
        solved = budget.allocate(
            setup, plan.compressions, plan.ranks, bits_budget, plan.sweep, options=measured[0]
        )
    except BudgetError as error:
        # refused before any work by the plan (config.network_plan.check_budgets_reachable); kept in
        # case a measured option ever prices above its shape's cost
        message = budget.unreachable(bits_budget, setup.template, error.cheapest_bits)
        raise UsageError(message) from error
    except SensitivityError as error:
        raise UsageError(
            f"--bits-budget {bits_budget:g}: {error} (NaN or infinite weights or outputs); "
            "check the model's weights"
        ) from error
    allocation = solved.allocation
    log.info(
        "bit budget %g bits/weight: %s in %.1f s; %.4f bits/weight chosen, summed sensitivity "
        "(%s) %.4g%s",
        bits_budget, "solved exactly" if allocation.exact else "greedy",
        time.perf_counter() - started, allocation.bits / setup.template.weights(), sensitivity,
        allocation.sensitivity,
        "" if allocation.exact else f" (at most {allocation.gap:.4g} above the optimum)",
    )  # fmt: skip
    return solved


def budget_name(bits_budget: float) -> str:
    return f"budget{bits_budget:g}"


def total_steps(plan) -> int:
    """Progress units of the run: the Pareto study's trials, or every rank's steps."""
    from train_evaluate.search.sweep import steps_per_rank

    if plan.search == "pareto":
        return plan.sweep.trials
    return plan.models * steps_per_rank(plan.sweep)


def run_storage(plan):
    """The run's Optuna storage: its own SQLite file, or the storage shared by its workers."""
    from train_evaluate.search.storage import open_storage, shared_storage

    if plan.shared:
        url = plan.storage or f"sqlite:///{(plan.out / 'optuna.sqlite3').resolve()}"
        return shared_storage(url, plan.heartbeat)
    return open_storage(plan.out / "optuna.sqlite3")


def sweep_methods(plan, context, build, original) -> tuple[list, list]:
    """Every method's rows of evaluation.csv (and of layers.csv, whole network)."""
    from train_evaluate.outputs import report
    from train_evaluate.search import pareto
    from train_evaluate.search.records import rank_record

    rows, layer_rows, candidates, built, records = [], [], {}, [], {}
    # the budgets first, smallest first: one below every choice is refused before any other work
    network = plan.network
    budgets = network.bits_budgets if network is not None else ()
    jobs = [(budget_name(b), None, b) for b in budgets]
    if network is not None and network.layer_plan is not None:
        jobs.append((network.layer_plan.name, None, None))
    elif network is None or not network.budget_only:
        jobs += [(name, compression, None) for name, compression in plan.compressions.items()]
    for name, compression, bits_budget in jobs:
        done = build(name, compression) if compression else build(name, None, bits_budget)
        log.info(
            "%s: compressed only, test top-1 %.2f%%",
            done.method.config.describe(),
            done.compressed["acc"],
        )
        if plan.search == "pareto":
            candidates[name] = pareto.Candidate(
                done.method, done.accounting, done.compressed["acc"]
            )
            rows += report.method_rows(
                done.shared, original, done.compressed, done.method.cost, [], done.accounting
            )
            continue
        built.append(done)
        if context.sharing is None:  # one process: rank after rank, as they come
            ranks = plan.ranks if done.rank is None else (done.rank,)
            records[name] = [rank_record(context, done.method, rank) for rank in ranks]
    if context.sharing is not None:
        records = share_ranks(context, [done.method for done in built], plan.ranks)
    for done in built:
        rows += report.method_rows(
            done.shared,
            original,
            done.compressed,
            done.method.cost,
            records[done.method.name],
            done.accounting,
        )
        if plan.network is not None:
            from train_evaluate.outputs.accounting import with_budget, with_reconstruction

            reconstructed = plan.network.reconstruction.enabled
            for record in records[done.method.name]:
                rank_rows = done.accounting.layer_rows(done.method.name, record["rank"])
                if done.budget is not None:
                    rank_rows = with_budget(rank_rows, done.budget)
                if reconstructed:
                    rank_rows = with_reconstruction(rank_rows, record.get("reconstruction"))
                layer_rows += rank_rows
    if candidates:
        pareto_search(plan, context, candidates, plan.out)
    return rows, layer_rows


def share_ranks(context, methods, ranks) -> dict[str, list]:
    """Many workers: every (method, rank) until each has its record, working wherever there is
    a free trial or a final to claim, waiting only when there is none anywhere. Whole ranks
    (``--share ranks``) are taken largest first: the longest come first and the short ones
    fill in at the end, when a worker would otherwise wait on another's last rank."""
    from train_evaluate.search import workers
    from train_evaluate.search.records import rank_record

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


def pareto_search(plan, context, candidates, out) -> None:
    """``--search pareto``: the study, the front's final models and pareto.csv."""

    from lora.rounding import round_stored_
    from train_evaluate.outputs import report
    from train_evaluate.outputs.checkpoint import write_packed
    from train_evaluate.search import pareto
    from train_evaluate.search.records import checkpoint_info
    from train_evaluate.search.sweep import train_one

    sweep, splits = plan.sweep, context.splits
    context.progress.label = "pareto search"
    study = pareto.run_search(
        candidates, list(plan.ranks), splits, sweep, context.storage, train_one,
        context.progress.step,
    )  # fmt: skip
    chosen = pareto.front(study, sweep.trials)
    info = checkpoint_info(context)

    def write(path, layer, metrics, method, rank):
        # the front model's plan, in the file and beside it (what --layer-plan reads back)
        layer_plan = method.layer_plan(rank, plan.adapter_dtype)
        as_json = layer_plan.to_json(method.descriptions())
        report.write_plan(out / "plans" / f"{path.stem}.json", as_json)
        extra = {**info, "layer_plan": as_json, "init": sweep.init, "metrics": metrics}
        return write_packed(path, method.adapters_of(layer), layer_plan.adapter_dtypes(), extra)

    def round_stored(layer, method, rank):
        dtypes = method.layer_plan(rank, plan.adapter_dtype).adapter_dtypes()
        round_stored_(method.adapters_of(layer), dtypes)

    rows = pareto.final_rows(
        chosen, candidates, splits, sweep, train_one, out, write, plan.device, round_stored
    )
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


def write_report(plan, storage, rows, layer_rows) -> None:
    """evaluation.csv, layers.csv, the summary plot (and the rows in a shared storage), then
    the summary of every run under --results-dir."""
    from train_evaluate.inputs.backbone import weights_id
    from train_evaluate.outputs import accounting as network_accounting
    from train_evaluate.outputs import figures, report, run_folder, summary
    from train_evaluate.runtime.files import write_text
    from train_evaluate.search.storage import store_report

    out, whole = plan.out, plan.network is not None
    frame = report.evaluation_frame(rows)
    # launchers sharing one folder write its report one at a time
    with run_folder.writing(out):
        csv_path = report.write_evaluation(out, frame)
        if whole:
            write_text(out / "layers.csv", network_accounting.layers_csv(layer_rows))
        report.repair_plotly_bundle(out)
        title = f"{plan.model}, {plan.sweep.init}" + (" (digits demo)" if plan.demo else "")
        figures.save_figure(figures.plot_summary(frame, title), out / "accuracy_vs_rank.png")
        if plan.shared:
            # the report's rows in the storage too: report.py --storage rebuilds them anywhere
            identity = weights_id(plan.model, plan.weights) if not plan.demo else "demo"
            store_report(
                storage, plan.study_prefix, run_folder.run_config(plan, identity), frame, title,
                network_accounting.layers_csv(layer_rows) if whole else None,
            )  # fmt: skip
        comparison = summary.write_report(plan.results_dir)
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


def run_results(plan, found, weights, split, started: float) -> dict[str, Any]:
    """run.json's results: what the run read, how much of it, with what, and how long."""
    import optuna
    import timm
    import torch

    cached = found.cached
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
