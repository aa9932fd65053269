"""What a run says before it starts: the data, the model, the layers, the cache, the study and
its size, one line each."""

from __future__ import annotations

import logging

from train_evaluate.config.network_plan import NetworkPlan
from train_evaluate.config.plan import Plan
from train_evaluate.config.run_options import DEFAULT_DATA

log = logging.getLogger("train_model")


def announce(plan: Plan) -> None:
    """What the run will do and how big it is, logged before any work."""
    if plan.demo:
        log.info(
            "DEMO RUN (%s): the offline demo on scikit-learn's digits with a small ViT trained "
            "here. For the real study, put the ImageNet validation folders (one per synset) at "
            "%s or pass --data-dir.",
            plan.demo_reason,
            DEFAULT_DATA,
        )
    log.info("data: %s", plan.source.description)
    log.info(
        "model: %s (classifier %d x %d), device %s, %d CPU threads",
        plan.model,
        *plan.fc_shape,
        plan.device,
        plan.threads,
    )
    if plan.default_ranks_skipped:
        log.info(
            "ranks %s do not fit %s; running %s",
            list(plan.default_ranks_skipped),
            "this classifier" if plan.network is None else "any selected layer",
            list(plan.ranks),
        )
    if plan.network is not None:
        announce_network(plan.network)
    sweep = plan.sweep
    runs = plan.models
    log.info(
        "study: init %s%s, methods %s, ranks %s, objective %s, seed %d -> %s",
        sweep.init,
        " + DoRA" if sweep.use_dora else "",
        ", ".join(c.describe() for c in plan.compressions.values()),
        list(plan.ranks),
        sweep.objective,
        sweep.seed,
        plan.out,
    )
    if sweep.epochs == 0:
        log.info("--epochs 0: every rank is the init only (no Optuna search, no training)")
        log.info(
            "size: %d images; %d models (method and rank, or budget), init only (no search, "
            "no training)",
            len(plan.source.ids),
            runs,
        )
    else:
        log.info(
            "size: %d images; %d models (method and rank, or budget) x (%d trials + %d final) x "
            "%d epochs = %d training runs, at most %d epochs",
            len(plan.source.ids),
            runs,
            sweep.trials,
            sweep.final_seeds,
            sweep.epochs,
            runs * (sweep.trials + sweep.final_seeds),
            runs * (sweep.trials + sweep.final_seeds) * sweep.epochs,
        )


def announce_network(net: NetworkPlan) -> None:
    """The selected layers, those ``all`` leaves out and why, and where the cache is cut."""
    log.info(
        "layers: %d selected by --layers %s (ranks clamped per layer to min(out, in*kh*kw); "
        "the list with each layer's rank and bits goes to layers.csv)",
        len(net.layers),
        net.selection,
    )
    for reason, names in net.left_out.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        log.info("left out by 'all' (%s): %s", reason, shown)
    size = "x".join(map(str, net.input_size))
    if net.cut is None:
        log.info(
            "cache: cut at the input (the decoded images, uint8 at %s): %.1f MB on disk "
            "(%s); every step runs the whole network, about %.0f s per training epoch here "
            "(estimated)",
            size,
            net.image_bytes / 1e6,
            net.why_input,
            net.epoch_seconds,
        )
    else:
        log.info(
            "cache: cut at %s, %.1f MB on disk, beside the decoded images (uint8 at %s, "
            "%.1f MB); every step runs the network from %s on (%d modules before it are "
            "skipped), about %.0f s per training epoch here (estimated)",
            net.cut.describe(),
            net.state_bytes / 1e6,
            size,
            net.image_bytes / 1e6,
            net.cut.module,
            len(net.cut.skipped),
            net.epoch_seconds,
        )
