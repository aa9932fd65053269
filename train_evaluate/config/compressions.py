"""The run's compression configs from its options: one checked config per method, named by
what it is (``int3-affine`` for ``--methods int3 --int-grid affine``), those of a layer plan
checked against the plan, and a warning for each compression option no method uses."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from compression import build_configs, parse_block
from lora.plan import LayerPlan
from train_evaluate.config.cli import INT_METHODS, UsageError
from train_evaluate.config.layer_plans import check_descriptions, read_layer_plan
from train_evaluate.config.run_options import RunOptions

log = logging.getLogger("train_model")


# The compression options of the command line and the config field each one sets.
COMPRESSION_OPTIONS = {
    "block": "block",
    "keep": "keep",
    "int1_scale": "scale",
    "int_scale": "int_scale",
    "int_grid": "int_grid",
    "scale_dtype": "scale_dtype",
    "quantizer": "quantizer",
    "nm": "pattern",
}


def uses_field(method: str, field: str, value: Any = None) -> bool:
    """Whether ``method``'s config has ``field`` (and, given a ``value``, accepts it)."""

    from compression import make_config

    if field not in {f.name for f in dataclasses.fields(make_config(method))}:
        return False
    try:
        return value is None or make_config(method, **{field: value}) is not None
    except ValueError:
        return False


def spelled(methods: Sequence[str]) -> str:
    """Method names for a message, the intN of every width and grid as one."""
    if set(INT_METHODS) <= set(methods):
        methods = [m for m in methods if m not in INT_METHODS]
        methods.insert(0, "int2 ... int8 (every grid)")
    return " ".join(methods)


def warn_unused_options(args: RunOptions, compressions: dict[str, Any]) -> None:
    """One warning per compression option (or preset) that no method of the run uses:
    ``make_config`` ignores the fields a method does not have, so ``--quantizer gptq --methods
    sparse`` would otherwise run plain sparse and say nothing."""
    from compression import list_methods
    from compression.presets import PRESETS

    methods = list(compressions)
    given = {k: vars(args)[k] for k in COMPRESSION_OPTIONS}
    for option, value in given.items():
        field = COMPRESSION_OPTIONS[option]
        if value is None or any(uses_field(m, field) for m in methods):
            continue
        users = [m for m in list_methods() if uses_field(m, field, value)]
        log.warning(
            "warning: --%s %s applies to --methods %s only; none of --methods %s uses it: ignored",
            option.replace("_", "-"),
            value,
            spelled(users),
            " ".join(methods),
        )
    preset = PRESETS.get(args.preset, {})
    if preset and not any(uses_field(m, f) for m in methods for f in preset):
        users = [m for m in list_methods() if any(uses_field(m, f) for f in preset)]
        log.warning(
            "warning: --preset %s sets %s, for --methods %s only; none of --methods %s uses "
            "them: ignored",
            args.preset,
            ", ".join(preset),
            spelled(users),
            " ".join(methods),
        )


def compression_configs(args: RunOptions, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """``methods`` (default --methods) with the compression options: one checked config per
    method, each under the name its config answers to (``--methods int3 --int-grid affine``
    runs ``int3-affine``: its rows, plans and files carry the grid's name)."""
    from compression import method_of

    return {method_of(config): config for config in _configs(args, methods).values()}


def _configs(args: RunOptions, methods: Sequence[str] | None) -> dict[str, Any]:
    try:
        # each option to the config field it sets; the block shape parsed from its text
        fields = {field: vars(args)[option] for option, field in COMPRESSION_OPTIONS.items()}
        fields["block"] = parse_block(args.block) if args.block else None
        methods = list(dict.fromkeys(args.methods if methods is None else methods))
        return build_configs(methods, args.preset, **fields)
    except ValueError as error:
        raise UsageError(str(error)) from error


def layer_plan_and_configs(
    args: RunOptions, model: str, compressions: dict[str, Any]
) -> tuple[LayerPlan | None, dict[str, Any]]:
    """``--layer-plan``: the plan resolved on ``model`` and the checked configs of its methods
    (each the config the plan was written with); without one, None and ``compressions``."""
    if args.layer_plan is None:
        return None, compressions
    from compression import method_of

    planned, described = read_layer_plan(args, model)
    for method, config in _configs(args, planned.methods).items():
        if method_of(config) != method:
            raise UsageError(
                f"--layer-plan {args.layer_plan}: its {method} is {method_of(config)} under "
                f"this run's --int-grid; name it so in the plan, or drop --int-grid"
            )
    configs = compression_configs(args, planned.methods)
    check_descriptions(args.layer_plan, described, configs)
    return planned, configs
