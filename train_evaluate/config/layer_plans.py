"""``--layer-plan FILE``: a per-layer plan (``lora.plan``) read, resolved against the model and
checked before any work, each refusal in one line."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch

from lora.plan import LayerPlan, LayerPlanError, read_plan_file, resolve_plan
from train_evaluate.config.cli import UsageError
from train_evaluate.config.run_options import RunOptions

log = logging.getLogger("train_model")

# what a plan decides in their place
REPLACED = ("layers", "methods", "ranks")


def read_layer_plan(args: RunOptions, model: str) -> tuple[LayerPlan, dict[str, str]]:
    """The plan of ``--layer-plan`` resolved on ``model``'s modules (a bare model on the meta
    device: names and shapes, no weights), and the method descriptions it records."""
    if args.bits_budget is not None or args.budget_only:
        raise UsageError(
            "--layer-plan gives each layer its method and rank; --bits-budget chooses them: "
            "give one of the two"
        )
    if args.search == "pareto" or args.workers > 1 or args.storage is not None:
        raise UsageError(
            "--layer-plan runs one model in one process: drop --search pareto, --workers and "
            "--storage"
        )
    try:
        raw = read_plan_file(args.layer_plan)
        with torch.device("meta"):
            bare = timm.create_model(model, pretrained=False)
        where = f"--layer-plan {args.layer_plan}"
        planned, described = resolve_plan(raw, bare, where, args.adapter_dtype)
    except LayerPlanError as error:
        raise UsageError(str(error)) from None
    if planned.adapter_dtype != args.adapter_dtype:
        raise UsageError(
            f"--layer-plan {args.layer_plan} stores its adapters as {planned.adapter_dtype}; "
            f"this run as {args.adapter_dtype}: pass --adapter-dtype {planned.adapter_dtype}"
        )
    ignored = [o for o in REPLACED if o in args.given()]
    if ignored:
        log.warning(
            "warning: --layer-plan gives each layer its method and rank: %s ignored",
            ", ".join(f"--{o}" for o in ignored),
        )
    return planned, described


def check_descriptions(path: Any, described: dict[str, str], compressions: dict[str, Any]) -> None:
    """Each method the plan records with its description is the config this run makes: a
    plan is never rebuilt with other compression options than it was written with."""
    for method, text in described.items():
        made = compressions[method].describe()
        if made != text:
            raise UsageError(
                f"--layer-plan {path}: its {method} is {text!r}; this run's options make "
                f"{made!r}: give the options it was written with (--config its run.json)"
            )
