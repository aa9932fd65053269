"""Whole-network planning: what ``--layers`` selects, where its cache is cut, the calibration,
reconstruction and bit-budget options, each checked before any work (one-line ``UsageError``);
the run folder's name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import timm
import torch

from compression.adaround import learns_rounding
from data import SplitFractions
from lora.cut import Cut
from lora.folding import conv_batchnorm_pairs, fold_batchnorm_
from lora.inits import ACTIVATION_AWARE_INITS, FitConfig, compresses_target
from lora.plan import LayerPlan
from lora.reconstruction import NO_RECONSTRUCTION, ReconstructionConfig
from train_evaluate.config.cli import UsageError
from train_evaluate.config.run_options import RunOptions

log = logging.getLogger("train_model")


@dataclass(frozen=True)
class NetworkPlan:
    """Whole-network mode (any selection but the classifier alone). layers: the selected
    module names; selection: the --layers text; input_size: the model's (C, H, W), at which
    the images are cached as uint8; cut: the block boundary whose output is cached and trained
    from (None: the images themselves, for the reason ``why_input`` gives); image_bytes,
    state_bytes: those caches' sizes; epoch_seconds: a rough cost of one training epoch on
    this machine."""

    layers: tuple[str, ...]
    selection: str
    calib_images: int
    input_size: tuple[int, ...]
    cut: Cut | None
    image_bytes: int
    state_bytes: int
    why_input: str
    epoch_seconds: float
    left_out: dict[str, list[str]]
    calibration: str = "symmetric"  # --calibration: asymmetric fits the clean outputs
    reconstruction: ReconstructionConfig = NO_RECONSTRUCTION  # --reconstruct and its options
    bits_budgets: tuple[float, ...] = ()  # --bits-budget: one more model each, smallest first
    budget_sensitivity: str = "output"  # --budget-sensitivity: what the budget minimises
    # --budget-sensitivity-steps: kl-reconstructed's block steps, where not the run's own
    budget_sensitivity_steps: int | None = None
    budget_only: bool = False  # --budget-only: no model with one method and rank everywhere
    layer_plan: LayerPlan | None = None  # --layer-plan with a choice per layer: its one model
    # (conv, BatchNorm) of each selected conv whose BatchNorm is folded into it before it is
    # compressed (lora.folding): the model a run compresses, scores and counts is the folded one
    folded: tuple[tuple[str, str], ...] = ()
    calib_augment: int = 1  # --calib-augment: views of each calibration image

    @property
    def cache_bytes(self) -> int:
        return self.image_bytes + self.state_bytes

    @property
    def sensitivity_reconstruction(self) -> ReconstructionConfig:
        """The reconstruction ``kl-reconstructed`` prices each option after: the run's, with
        ``--budget-sensitivity-steps`` block steps where given."""
        if self.budget_sensitivity_steps is None:
            return self.reconstruction
        return dataclasses.replace(self.reconstruction, block_steps=self.budget_sensitivity_steps)


def selection_name(selection: str, limit: int = 48) -> str:
    """--layers as part of a folder name: the readable slug alone where it names exactly this
    selection, else the slug (cut to ``limit``) and a hash of the selection's text.

    The slug drops what a folder name cannot hold: ``*``, ``?`` and ``**`` all became ``data``,
    ``blocks.*.mlp.fc*`` and ``blocks.?.mlp.fc*`` one name, so a second selection found the
    first one's folder and was told to --overwrite it. The slug alone is kept (today's names)
    for a module name (``all``, ``layer1.0.conv1``) and for ``X.*`` when ``X`` is one: the
    slug then drops only the ``.*``, and ``X`` and ``X.*`` are never both valid selections of
    one model (X is a Linear/Conv2d with no submodules, or a container that is not a layer).
    """
    import hashlib

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", selection).strip("._")
    exact = bool(name) and " " not in selection and selection in (name, f"{name}.*")
    name = name or "pattern"  # '*', '?': nothing readable is left
    if exact and len(name) <= limit:
        return name
    return f"{name[:limit]}-{hashlib.sha256(selection.encode()).hexdigest()[:8]}"


def plan_selection(planned: LayerPlan) -> str:
    """What a ``--layer-plan`` selects, as run folders and reports name it."""
    return f"plan {planned.name} {planned.digest()}"


def calibration_settings(args: RunOptions, train_images: int) -> tuple[int, ReconstructionConfig]:
    """The calibration images a run uses and its reconstruction's options: at most the train
    images, a reconstruction batch of at most those, each cut said in a warning (run.json
    records what is used, not what was asked)."""
    calib_images = min(args.calib_images, train_images)
    if calib_images < args.calib_images:
        log.warning(
            "warning: --calib-images %d is more than the %d train images (the calibration "
            "images are drawn from them): calibrating on all %d",
            args.calib_images, train_images, calib_images,
        )  # fmt: skip
    reconstruction = reconstruction_config(args)
    views = calib_images * args.calib_augment
    if reconstruction.enabled and reconstruction.batch_size > views:
        log.warning(
            "warning: --reconstruct-batch %d is more than the %d calibration views: each "
            "step takes all %d",
            reconstruction.batch_size, views, views,
        )  # fmt: skip
        reconstruction = dataclasses.replace(reconstruction, batch_size=views)
    return calib_images, reconstruction


def cache_cut(
    bare: torch.nn.Module,
    names: list[str],
    input_size: tuple,
    images: int,
    image_bytes: int,
    args: RunOptions,
) -> tuple[Cut | None, str]:
    """The deepest block boundary before every selected layer whose states fit beside the
    images within ``--cache-limit`` (the images stay cached: the states are computed from them,
    and evaluate.py reads them), or None and why the input itself is cached (always with
    ``--calib-augment``, whose views are cut from the images themselves). Images alone over the
    limit: refused."""
    from lora import cut

    limit = args.cache_limit * 1e9
    if image_bytes > limit:
        raise UsageError(
            f"the image cache for --layers {' '.join(args.layers)} would take "
            f"{image_bytes / 1e9:.1f} GB ({images} images at {input_size}), over "
            f"--cache-limit {args.cache_limit:g} GB; raise the limit or use fewer images"
        )
    if args.calib_augment > 1:
        return None, "--calib-augment draws its views from the images themselves"
    found = cut.find_cut(
        bare, names, input_size, fits=lambda c: image_bytes + c.state_bytes(images) <= limit
    )
    if found is not None:
        return found, ""
    unlimited = cut.find_cut(bare, names, input_size)
    if unlimited is None:
        return None, "no block boundary before every selected layer carries the whole state"
    more = unlimited.state_bytes(images) / 1e9
    return (
        None,
        f"the states at {unlimited.module} would take {more:.2f} GB more, over --cache-limit",
    )


def plan_network(
    args: RunOptions,
    model: str,
    source: Any,
    fractions: SplitFractions,
    device,
    planned: LayerPlan | None = None,
) -> NetworkPlan | None:
    """The whole-network plan for ``--layers`` (or the modules of ``--layer-plan``: one model
    if it makes a choice per layer, else that (method, rank)), or None when it selects the
    classifier alone. Selection, folding, cache size and epoch cost are worked out on a bare
    model (random weights: the structure and compute of the pretrained one)."""
    from timm.data import resolve_data_config

    from lora import cut
    from train_evaluate.inputs import images as image_cache
    from train_evaluate.inputs import selection as layer_selection
    from train_evaluate.inputs.backbone import eval_transform

    patterns = list(dict.fromkeys(args.layers if planned is None else planned.names))
    if patterns == [layer_selection.HEAD]:
        return None
    try:
        with torch.random.fork_rng():
            bare = timm.create_model(model, pretrained=False).eval()
    except Exception as error:  # a model that cannot be built without extra arguments
        raise UsageError(f"cannot build timm model {model}: {error}") from error
    try:
        names = layer_selection.select_layers(bare, patterns, args.skip_depthwise)
    except layer_selection.SelectionError as error:
        raise UsageError(str(error)) from error
    if layer_selection.is_head_only(bare, names):
        return None
    input_size = tuple(resolve_data_config({}, model=bare)["input_size"])
    folded = fold_selected_(bare, names, input_size)
    images = len(source.ids)
    image_bytes = image_cache.image_bytes(images, input_size)
    found, why_input = cache_cut(bare, names, input_size, images, image_bytes, args)
    transform = eval_transform(bare)
    mean, std = image_cache.normalisation(transform)
    if found is None:
        model = image_cache.ImageModel(bare, mean, std)
    else:
        model = image_cache.StateModel(
            cut.cut_model(bare, found, input_size), mean, std, found.state_shape
        )
    train_images = max(1, fractions.sizes(images)["train"])
    calib_images, reconstruction = calibration_settings(args, train_images)
    seconds = image_cache.epoch_seconds(
        model.to(device), image_cache.example_inputs(model, input_size, 8), train_images
    )
    selection = " ".join(patterns) if planned is None else plan_selection(planned)
    return NetworkPlan(
        layers=tuple(names),
        selection=selection + (" --skip-depthwise" if args.skip_depthwise else ""),
        calib_images=calib_images,
        input_size=input_size,
        cut=found,
        image_bytes=image_bytes,
        state_bytes=0 if found is None else found.state_bytes(images),
        why_input=why_input,
        epoch_seconds=seconds,
        left_out=layer_selection.left_out(bare, names) if layer_selection.ALL in patterns else {},
        calibration=args.calibration,
        reconstruction=reconstruction,
        # each budget as its rows name it (budget<B>, B to 6 digits), once, smallest first
        bits_budgets=tuple(sorted({float(f"{b:g}") for b in args.bits_budget or ()})),
        budget_sensitivity=args.budget_sensitivity,
        budget_sensitivity_steps=args.budget_sensitivity_steps,
        budget_only=args.budget_only,
        layer_plan=None if planned is None or planned.cell else planned,
        folded=folded,
        calib_augment=args.calib_augment,
    )


def fold_selected_(
    model: torch.nn.Module, names: list[str], input_size: tuple
) -> tuple[tuple[str, str], ...]:
    """Fold, in ``model``, the BatchNorm that alone reads each selected conv (found in one
    forward pass at ``input_size``), as a run folds them before compressing; returns those
    (conv, BatchNorm) pairs."""
    example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    pairs = conv_batchnorm_pairs(model, example)
    folded = tuple((name, pairs[name]) for name in names if name in pairs)
    fold_batchnorm_(model, dict(folded))
    return folded


def check_budget(args: RunOptions, network_plan: NetworkPlan | None) -> None:
    """--bits-budget's refusals, each in one line."""
    steps = args.budget_sensitivity_steps
    if steps is not None and args.budget_sensitivity != "kl-reconstructed":
        raise UsageError(
            "--budget-sensitivity-steps sets the reconstruction steps of --budget-sensitivity "
            "kl-reconstructed: add that, or drop --budget-sensitivity-steps"
        )
    if steps is not None and steps < 1:
        raise UsageError(f"--budget-sensitivity-steps must be at least 1; got {steps}")
    budgets = args.bits_budget
    if budgets is None:
        if args.budget_sensitivity != "output":
            raise UsageError(
                "--budget-sensitivity says what --bits-budget minimises; add --bits-budget B"
            )
        if args.budget_only:
            raise UsageError("--budget-only keeps the budgeted models alone; add --bits-budget B")
        return
    if network_plan is None:
        raise UsageError(
            "--bits-budget spreads bits over the selected layers; with the classifier alone "
            "there is one layer: drop it or select more --layers"
        )
    if args.budget_sensitivity == "kl-reconstructed" and not network_plan.reconstruction.enabled:
        raise UsageError(
            "--budget-sensitivity kl-reconstructed measures each option after its block's "
            "reconstruction: add --reconstruct block (or network)"
        )
    named: dict[str, float] = {}
    for budget in budgets:
        if not budget > 0 or not math.isfinite(budget):
            raise UsageError(
                f"--bits-budget must be a positive number of bits per weight; got {budget:g}"
            )
        # rows are named budget<B> with B to 6 significant digits: two budgets, one name
        name = f"{budget:g}"
        if name in named:
            raise UsageError(
                f"--bits-budget {named[name]:.15g} and {budget:.15g} would both be the rows "
                f"budget{name}; "
                "give each budget once, differing within 6 significant digits"
            )
        named[name] = budget
    if args.search == "pareto" or args.workers > 1 or args.storage is not None:
        raise UsageError(
            "--bits-budget runs in one process with the rank-by-rank search: drop --search "
            "pareto, --workers and --storage"
        )


def check_budgets_reachable(
    model: str, network_plan: NetworkPlan, compressions: dict[str, Any], ranks, args
) -> None:
    """Every --bits-budget at least what the cheapest option of every layer stores, checked on
    the bare model's shapes (``meta`` tensors) before any image is read or any file written."""
    from train_evaluate.inputs.backbone import bits_outside, layer_weights
    from train_evaluate.inputs.selection import LayerInfo
    from train_evaluate.outputs.accounting import Accounting
    from train_evaluate.training import budget

    with torch.device("meta"):
        bare = timm.create_model(model, pretrained=False)
    fold_batchnorm_(bare, dict(network_plan.folded))  # shapes only: a bias where one is folded
    names = network_plan.layers
    template = Accounting(
        tuple(LayerInfo.of(n, bare.get_submodule(n)) for n in names), (), args.adapter_dtype,
        args.dora, args.include_bias, bits_outside(bare, names), network_plan.selection,
        layer_weights(bare),
    )  # fmt: skip
    cheapest = budget.cheapest_bits(template, compressions, ranks)
    for bits_budget in network_plan.bits_budgets:
        # the solver's own test: what the budget leaves the selected layers, in whole bits
        if cheapest > template.budget_bits(bits_budget):
            raise UsageError(budget.unreachable(bits_budget, template, cheapest))


def reconstruction_config(args: RunOptions) -> Any:
    """--reconstruct and its options as a ReconstructionConfig (checked)."""
    try:
        return ReconstructionConfig(
            mode=args.reconstruct,
            block_steps=args.reconstruct_steps,
            network_steps=args.reconstruct_network_steps,
            lr=args.reconstruct_lr,
            batch_size=args.reconstruct_batch,
            held_out=args.reconstruct_held_out,
            drop=args.reconstruct_drop,
            weighting=args.reconstruct_weighting,
            relaxation=args.rounding_relaxation,
            rounding_weight=args.rounding_weight,
            rounding_lr=args.rounding_lr,
        )
    except ValueError as error:
        raise UsageError(f"{error}: check --reconstruct-steps, -network-steps, -lr, -batch, "
                         "-held-out, -drop, --rounding-weight and -lr") from error  # fmt: skip


def largest_layer(model: str, names: tuple[str, ...]) -> tuple[int, int]:
    """The (out, in*kh*kw) matrix of the selected layer that can hold the largest rank."""
    with torch.device("meta"):
        bare = timm.create_model(model, pretrained=False)
    shapes = [tuple(bare.get_submodule(n).weight.flatten(1).shape) for n in names]
    return max(shapes, key=min)


def check_network_options(
    args: RunOptions, network_plan: NetworkPlan | None, compressions: dict[str, Any]
) -> None:
    """The options that only a whole-network run (or only the classifier alone) can use,
    refused in one line where they would be ignored or cannot work; then the fits' options."""
    if network_plan is not None and args.decode != "cpu":
        raise UsageError(
            "--decode gpu applies to the feature pass of --layers head; whole-network runs "
            "decode their image cache with PIL: drop --decode"
        )
    if network_plan is None and args.calibration == "asymmetric":
        raise UsageError(
            "--calibration asymmetric corrects the error that compressed layers before a layer "
            "pass on; the classifier alone sees clean inputs, where it equals symmetric: drop it "
            "or select more --layers"
        )
    asymmetric = network_plan is not None and network_plan.calibration == "asymmetric"
    if asymmetric and (
        args.init not in ACTIVATION_AWARE_INITS
        and not any(compresses_target(config) for config in compressions.values())
    ):
        raise UsageError(
            f"--calibration asymmetric changes only the fits of "
            f"{' and '.join(ACTIVATION_AWARE_INITS)} and the rounding of --quantizer gptq; "
            f"with --init {args.init} and --methods {' '.join(compressions)} it would change "
            "nothing: drop it, or choose one of those"
        )
    if network_plan is None and args.calib_augment > 1:
        raise UsageError(
            "--calib-augment draws views of the calibration images of a whole-network run; the "
            "classifier alone calibrates on the cached features: drop it or select more --layers"
        )
    if network_plan is None and args.skip_depthwise:
        raise UsageError(
            "--skip-depthwise leaves grouped convs out of --layers; the classifier alone has "
            "none: drop it or select more --layers"
        )
    if network_plan is None and args.reconstruct != "none":
        raise UsageError(
            "--reconstruct trains adapters to reproduce the uncompressed network block by "
            "block; with the classifier alone there is one layer and no block: drop it or "
            "select more --layers"
        )
    learned = [m for m, c in compressions.items() if learns_rounding(c)]
    reconstructs = network_plan is not None and network_plan.reconstruction.enabled
    if learned and not reconstructs:
        raise UsageError(
            "--quantizer adaround learns each weight's rounding inside the block "
            "reconstruction: add --reconstruct block (or network) and select --layers"
        )
    check_unread_options(args, network_plan.reconstruction.mode if reconstructs else None,
                         bool(learned))  # fmt: skip
    check_fit_options(args, network_plan, compressions)


# options that only the reconstruction reads, only its network stage, only learned rounding
RECONSTRUCTION_OPTIONS = ("reconstruct_steps", "reconstruct_lr", "reconstruct_batch",
                          "reconstruct_held_out", "reconstruct_drop",
                          "reconstruct_weighting")  # fmt: skip
NETWORK_STAGE_OPTIONS = ("reconstruct_network_steps",)
ROUNDING_OPTIONS = ("rounding_relaxation", "rounding_weight", "rounding_lr")


def check_unread_options(args: RunOptions, mode: str | None, learns_rounding: bool) -> None:
    """An option moved from its default where nothing in the run reads it is refused in one
    line: a run that silently ignores it would be recorded as if it had used it. ``mode``: the
    run's reconstruction (``block`` or ``network``), None without one."""
    defaults = RunOptions()
    for names, read, remedy in (
        (RECONSTRUCTION_OPTIONS, mode is not None, "add --reconstruct block (or network)"),
        (NETWORK_STAGE_OPTIONS, mode == "network", "use --reconstruct network"),
        (ROUNDING_OPTIONS, learns_rounding, "add --quantizer gptq-adaround (or adaround) and "
                                            "--reconstruct block"),
    ):  # fmt: skip
        changed = [name for name in names if getattr(args, name) != getattr(defaults, name)]
        if changed and not read:
            flag = "--" + changed[0].replace("_", "-")
            raise UsageError(f"{flag} is read by nothing in this run: drop it, or {remedy}")


def fit_config(args: RunOptions) -> FitConfig:
    """The act-aware fits' ridge and asymmetric strength: the options given, FitConfig's
    defaults for the others."""
    given = {"ridge": args.fit_ridge, "asymmetric_strength": args.asymmetric_strength}
    return FitConfig(**{name: value for name, value in given.items() if value is not None})


def check_fit_options(
    args: RunOptions, network_plan: NetworkPlan | None, compressions: dict[str, Any]
) -> None:
    """--fit-ridge and --asymmetric-strength: in range, and refused where no fit reads them."""
    asymmetric = network_plan is not None and network_plan.calibration == "asymmetric"
    if args.fit_ridge is not None:
        if not (args.fit_ridge > 0 and math.isfinite(args.fit_ridge)):
            raise UsageError(f"--fit-ridge must be a positive number; got {args.fit_ridge}")
        targeted = asymmetric and any(compresses_target(c) for c in compressions.values())
        if args.init not in ACTIVATION_AWARE_INITS and not targeted:
            raise UsageError(
                f"--fit-ridge regularises the fits of {' and '.join(ACTIVATION_AWARE_INITS)} "
                f"and of --calibration asymmetric with --quantizer gptq; --init {args.init} "
                "fits without it: drop it, or choose one of those"
            )
    if args.asymmetric_strength is not None:
        if not 0 <= args.asymmetric_strength <= 1:
            raise UsageError(
                f"--asymmetric-strength must be in [0, 1]; got {args.asymmetric_strength}"
            )
        if not asymmetric:
            raise UsageError(
                "--asymmetric-strength weighs the clean outputs of --calibration asymmetric: "
                "add --calibration asymmetric (whole network), or drop it"
            )


def run_name(args: RunOptions, network_plan: NetworkPlan | None) -> str:
    """The run folder's last part: the init, then what sets the run apart (the selection, the
    calibration, the reconstruction, the Pareto search), so that such runs never share one."""
    run_name = args.init
    if network_plan is not None:
        run_name += f"_layers-{selection_name(network_plan.selection)}"
        if network_plan.calibration != "symmetric":
            run_name += f"_{network_plan.calibration}"
        if network_plan.reconstruction.enabled:
            run_name += f"_reconstruct-{network_plan.reconstruction.mode}"
    if args.search == "pareto":
        run_name += "_pareto"
    return run_name
