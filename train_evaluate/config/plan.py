"""The driver's arguments checked into a ``Plan``: everything a run needs, before any work.

Every check that can fail does so here, with a one-line ``UsageError``, before a file or folder
is written: unknown names, impossible numbers, unwritable folders, missing data, a model whose
head does not predict ImageNet-1k classes, weights that do not load into the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from compression import build_configs, parse_block
from data import DataError, SplitFractions, load_digits_source, scan_imagenet_folder
from lora import LORA_INITS
from lora.reconstruction import NO_RECONSTRUCTION, ReconstructionConfig
from train_evaluate.config.cli import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    DEFAULT_RANKS,
    UsageError,
    available_cores,
    dump_options,
    resolve_device,
)
from train_evaluate.inputs.backbone import (
    BackboneError,
    check_model_name,
    classifier_shape,
    create_backbone,
)
from train_evaluate.inputs.cut import Cut
from train_evaluate.inputs.demo import DEMO_MODEL
from train_evaluate.outputs.run_folder import folder_name
from train_evaluate.runtime.files import check_writable
from train_evaluate.search.sweep import SearchSpace, SweepConfig
from train_evaluate.training.training import TrainConfig

log = logging.getLogger("train_model")

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Plan:
    """Validated arguments. ``backbone`` is the loaded model (None for the demo, whose
    classifier is trained by the run itself)."""

    demo: bool
    demo_reason: str
    source: Any
    data_name: str
    model: str
    weights: Path | None
    backbone: nn.Module | None
    ranks: tuple[int, ...]
    default_ranks_skipped: tuple[int, ...]
    fc_shape: tuple[int, int]
    compressions: dict[str, Any]
    sweep: SweepConfig
    fractions: SplitFractions
    device: torch.device
    threads: int
    feature_batch_size: int
    decode_workers: int | None
    adapter_dtype: str
    include_bias: bool
    results_dir: Path
    out: Path
    cache_dir: Path
    overwrite: bool
    network: NetworkPlan | None = None
    decode: str = "cpu"
    search: str = "rank"
    # many workers (train_evaluate.search.workers): the storage URL (None: the run folder's SQLite
    # file), study-name prefix, worker processes on this machine, how they divide the sweep
    # ("trials" or "ranks", see workers), heartbeat seconds, the launcher's pid in a worker,
    # and the command's own arguments (to start workers with)
    storage: str | None = None
    study_prefix: str = ""
    workers: int = 1
    # each local worker's sweep threads: --threads if given, else the cores divided among the
    # workers (more threads than cores slow every one down); the launcher builds the caches
    # on all of ``threads`` before its workers start
    worker_threads: int = 1
    share: str = "trials"
    heartbeat: int = 10
    worker_of: int | None = None
    argv: tuple[str, ...] = ()
    options: dict[str, Any] | None = None  # every option, as run.json records them (--config)

    @property
    def models(self) -> int:
        """The (method, rank) models the run builds: every method at every rank (none with
        --budget-only), and one per --bits-budget."""
        if self.network is None:
            return len(self.compressions) * len(self.ranks)
        uniform = 0 if self.network.budget_only else len(self.compressions) * len(self.ranks)
        return uniform + len(self.network.bits_budgets)

    @property
    def shared(self) -> bool:
        """Whether other processes may work on the same studies: then nothing running may be
        taken for dead at start, and trials beat a heartbeat."""
        return self.storage is not None or self.workers > 1 or self.worker_of is not None


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
    budget_only: bool = False  # --budget-only: no model with one method and rank everywhere

    @property
    def cache_bytes(self) -> int:
        return self.image_bytes + self.state_bytes


def unique(values) -> list:
    return list(dict.fromkeys(values))


def check_numbers(args: argparse.Namespace) -> None:
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1; got {args.trials}")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be 0 (init only) or more; got {args.epochs}")
    if args.search == "pareto" and args.epochs == 0:
        raise UsageError("--search pareto searches training settings: it needs --epochs >= 1")
    if args.search == "pareto" and (args.workers > 1 or args.storage is not None):
        raise UsageError(
            "--search pareto runs in one process on the run folder's storage: drop --workers "
            "and --storage"
        )
    if args.final_seeds < 1 or args.loftq_iters < 1:
        raise UsageError("--final-seeds and --loftq-iters must be at least 1")
    low, high = args.lr_range
    if not (0 < low <= high and math.isfinite(high)):
        raise UsageError(f"--lr-range needs 0 < LOW <= HIGH; got {low:g} {high:g}")
    if min(args.batch_sizes) < 1 or min(args.alphas) < 1:
        raise UsageError("--batch-sizes and --alphas must be positive integers")
    if args.feature_batch_size < 1 or (args.decode_workers is not None and args.decode_workers < 0):
        raise UsageError("--feature-batch-size must be >= 1 and --decode-workers >= 0")
    if args.workers < 1 or args.heartbeat < 1:
        raise UsageError("--workers and --heartbeat must be at least 1")
    if args.ranks is not None and min(args.ranks) < 1:
        raise UsageError(f"--ranks must be at least 1; got {min(args.ranks)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1; got {args.threads}")
    if args.calib_images < 1:
        raise UsageError(f"--calib-images must be at least 1; got {args.calib_images}")
    if not (args.cache_limit > 0 and math.isfinite(args.cache_limit)):
        raise UsageError(f"--cache-limit must be a positive number of GB; got {args.cache_limit}")


def check_folders(args: argparse.Namespace, out: Path, cache_dir: Path) -> None:
    for folder, flag in ((args.results_dir, "--results-dir"), (out, "--out"),
                         (cache_dir, "--cache-dir")):  # fmt: skip
        problem = check_writable(folder)
        if problem:
            raise UsageError(f"cannot write {flag} {folder}: {problem}")


def check_imagenet_head(model: str, out_features: int) -> None:
    """The folder's labels are ImageNet-1k class indices in timm's order: the head must
    predict exactly those 1000 classes, with no label offset (a background class first)."""
    config = timm.models.get_pretrained_cfg(model)
    offset = (getattr(config, "label_offset", None) or 0) if config is not None else 0
    if out_features != IMAGENET_CLASSES or offset:
        extra = f" and a label offset of {offset}" if offset else ""
        raise UsageError(
            f"{model}'s classifier has {out_features} outputs{extra}, but the images are "
            f"labelled with the {IMAGENET_CLASSES} ImageNet-1k classes in timm's order; choose "
            "a model with an ImageNet-1k head (e.g. resnet18.tv_in1k)"
        )


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights hub answers at all: offline, timm would retry for about a minute."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_weights_cached(model: str) -> bool:
    """Whether timm's hub weights for ``model`` are already in the local Hugging Face cache."""
    config = timm.models.get_pretrained_cfg(model)
    hub_id = getattr(config, "hf_hub_id", None) if config is not None else None
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    return any(
        isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str)
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    )


def resolve_data_and_model(args: argparse.Namespace) -> tuple[bool, str, Any, str, Path | None]:
    """(demo?, why the demo, image source, model name, weights file) for these arguments."""
    data_dir = args.data_dir or DEFAULT_DATA
    demo = args.demo or (args.data_dir is None and not DEFAULT_DATA.exists())
    if demo:
        if args.model or args.weights:
            raise UsageError(
                f"--model/--weights need ImageNet images: pass --data-dir (none at {DEFAULT_DATA})"
            )
        reason = "--demo" if args.demo else f"no ImageNet folder at {DEFAULT_DATA}"
        return True, reason, load_digits_source(), DEMO_MODEL, None
    if not data_dir.exists():
        raise UsageError(
            f"data folder {data_dir} does not exist; run without --data-dir for the offline demo, "
            "or point --data-dir at an ImageNet folder (one subfolder per synset)"
        )
    model = args.model or DEFAULT_MODEL
    try:
        check_model_name(model)
        source = scan_imagenet_folder(data_dir)
    except (DataError, BackboneError) as error:
        raise UsageError(str(error)) from error
    if args.weights is not None and not args.weights.is_file():
        raise UsageError(f"weights file {args.weights} does not exist")
    return False, "", source, model, args.weights


def choose_ranks(
    requested: list[int] | None, shape: tuple[int, int], model: str, whole: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ranks to run, default ranks left out because they exceed min(out, in)). In
    whole-network mode ``shape`` is the largest layer's: each layer clamps the rank itself."""
    out_features, in_features = shape
    limit = min(shape)
    what = "largest selected layer" if whole else "classifier"
    if requested is None:
        ranks = tuple(r for r in DEFAULT_RANKS if r <= limit)
        if not ranks:
            raise UsageError(f"no default rank fits the {out_features} x {in_features} {what}")
        return ranks, tuple(r for r in DEFAULT_RANKS if r > limit)
    ranks = tuple(sorted(unique(requested)))
    if max(ranks) > limit:
        raise UsageError(
            f"rank {max(ranks)} does not fit the {out_features} x {in_features} {what} of "
            f"{model}: ranks must be between 1 and {limit}"
        )
    return ranks, ()


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        init=args.init,
        trials=args.trials,
        epochs=args.epochs,
        seed=args.seed,
        final_seeds=args.final_seeds,
        pruning=not args.no_pruning,
        use_dora=args.dora,
        loftq_iters=args.loftq_iters,
        objective=args.objective,
        kd_temperature=args.kd_temperature,
        kd_weight=args.kd_weight,
        space=SearchSpace(
            lr=tuple(args.lr_range),
            batch_sizes=tuple(unique(args.batch_sizes)),
            alphas=tuple(unique(args.alphas)),
        ),
    )


def load_backbone(model: str, weights: Path | None, device: torch.device) -> nn.Module:
    """The pretrained model, loaded now so that bad weights are refused before any write."""
    if weights is None and not hub_weights_cached(model) and not hub_reachable():
        raise UsageError(
            f"no internet to fetch the pretrained weights of {model}, and none in the local hub "
            "cache; pass a local state dict with --weights FILE"
        )
    try:
        return create_backbone(model, weights, device)
    except BackboneError as error:
        raise UsageError(str(error)) from error


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


def plan_network(
    args: argparse.Namespace, model: str, source: Any, fractions: SplitFractions, device
) -> NetworkPlan | None:
    """The whole-network plan for ``--layers``, or None when it selects the classifier alone.
    Selection, cache size and epoch cost are worked out on a bare model (random weights: the
    structure and the compute are those of the pretrained one)."""
    from timm.data import resolve_data_config

    from train_evaluate.inputs import cut
    from train_evaluate.inputs import images as image_cache
    from train_evaluate.inputs import selection as layer_selection
    from train_evaluate.inputs.backbone import eval_transform

    patterns = unique(args.layers)
    if patterns == [layer_selection.HEAD]:
        return None
    try:
        with torch.random.fork_rng():
            bare = timm.create_model(model, pretrained=False).eval()
    except Exception as error:  # a model that cannot be built without extra arguments
        raise UsageError(f"cannot build timm model {model}: {error}") from error
    try:
        names = layer_selection.select_layers(bare, patterns)
    except layer_selection.SelectionError as error:
        raise UsageError(str(error)) from error
    if layer_selection.is_head_only(bare, names):
        return None
    input_size = tuple(resolve_data_config({}, model=bare)["input_size"])
    images = len(source.ids)
    image_bytes = image_cache.image_bytes(images, input_size)
    limit = args.cache_limit * 1e9
    if image_bytes > limit:
        raise UsageError(
            f"the image cache for --layers {' '.join(patterns)} would take "
            f"{image_bytes / 1e9:.1f} GB ({images} images at {input_size}), over "
            f"--cache-limit {args.cache_limit:g} GB; raise the limit or use fewer images"
        )
    # the deepest block boundary before every selected layer whose states fit beside the images
    # (which stay cached: the states are computed from them, and evaluate.py reads them)
    found = cut.find_cut(
        bare, names, input_size, fits=lambda c: image_bytes + c.state_bytes(images) <= limit
    )
    why_input = "no block boundary before every selected layer carries the whole state"
    if found is None:
        unlimited = cut.find_cut(bare, names, input_size)
        if unlimited is not None:
            why_input = (
                f"the states at {unlimited.module} would take "
                f"{unlimited.state_bytes(images) / 1e9:.2f} GB more, over --cache-limit"
            )
    transform = eval_transform(bare)
    mean, std = image_cache.normalisation(transform)
    if found is None:
        model = image_cache.ImageModel(bare, mean, std)
    else:
        model = image_cache.StateModel(
            cut.cut_model(bare, found, input_size), mean, std, found.state_shape
        )
    train_images = max(1, fractions.sizes(images)["train"])
    calib_images = min(args.calib_images, train_images)
    if calib_images < args.calib_images:
        log.warning(
            "warning: --calib-images %d is more than the %d train images (the calibration "
            "images are drawn from them): calibrating on all %d",
            args.calib_images, train_images, calib_images,
        )  # fmt: skip
    reconstruction = reconstruction_config(args)
    if reconstruction.enabled and reconstruction.batch_size > calib_images:
        log.warning(
            "warning: --reconstruct-batch %d is more than the %d calibration images: each "
            "step takes all %d",
            reconstruction.batch_size, calib_images, calib_images,
        )  # fmt: skip
        reconstruction = dataclasses.replace(reconstruction, batch_size=calib_images)
    seconds = image_cache.epoch_seconds(
        model.to(device), image_cache.example_inputs(model, input_size, 8), train_images
    )
    return NetworkPlan(
        layers=tuple(names),
        selection=" ".join(patterns),
        calib_images=calib_images,
        input_size=input_size,
        cut=found,
        image_bytes=image_bytes,
        state_bytes=0 if found is None else found.state_bytes(images),
        why_input=why_input if found is None else "",
        epoch_seconds=seconds,
        left_out=layer_selection.left_out(bare, names) if layer_selection.ALL in patterns else {},
        calibration=args.calibration,
        reconstruction=reconstruction,
        # each budget as its rows name it (budget<B>, B to 6 digits), once, smallest first
        bits_budgets=tuple(sorted({float(f"{b:g}") for b in args.bits_budget or ()})),
        budget_sensitivity=args.budget_sensitivity,
        budget_only=args.budget_only,
    )


def check_budget(args: argparse.Namespace, network_plan: NetworkPlan | None) -> None:
    """--bits-budget's refusals, each in one line."""
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
    from train_evaluate.outputs.checkpoint import adapter_storage
    from train_evaluate.training import accounting, budget

    with torch.device("meta"):
        bare = timm.create_model(model, pretrained=False)
    layers = tuple(accounting.LayerInfo.of(n, bare.get_submodule(n)) for n in network_plan.layers)
    adapter_bits, code_bits = adapter_storage(args.adapter_dtype)
    template = accounting.NetworkAccounting(
        layers, (), adapter_bits, args.dora, args.include_bias, 0, network_plan.selection,
        code_bits,
    )  # fmt: skip
    cheapest = budget.cheapest_bits(template, compressions, ranks)
    for bits_budget in network_plan.bits_budgets:
        # the solver's own test: the budget in whole bits over the selected layers' weights
        if cheapest > math.floor(bits_budget * template.weights()):
            raise UsageError(budget.unreachable(bits_budget, cheapest / template.weights()))


def reconstruction_config(args: argparse.Namespace) -> Any:
    """--reconstruct and its options as a ReconstructionConfig (checked)."""
    try:
        return ReconstructionConfig(
            mode=args.reconstruct,
            block_steps=args.reconstruct_steps,
            network_steps=args.reconstruct_network_steps,
            lr=args.reconstruct_lr,
            batch_size=args.reconstruct_batch,
        )
    except ValueError as error:
        raise UsageError(f"{error}: check --reconstruct-steps, -network-steps, -lr and "
                         "-batch") from error  # fmt: skip


# The compression options of the command line and the config field each one sets.
COMPRESSION_OPTIONS = {
    "block": "block",
    "keep": "keep",
    "int1_scale": "scale",
    "int_scale": "int_scale",
    "quantizer": "quantizer",
    "nm": "pattern",
}


def uses_field(method: str, field: str, value: Any = None) -> bool:
    """Whether ``method``'s config has ``field`` (and, given a ``value``, accepts it)."""
    import dataclasses

    from compression import make_config

    if field not in {f.name for f in dataclasses.fields(make_config(method))}:
        return False
    try:
        return value is None or make_config(method, **{field: value}) is not None
    except ValueError:
        return False


def warn_unused_options(args: argparse.Namespace, compressions: dict[str, Any]) -> None:
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
            " ".join(users),
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
            " ".join(users),
            " ".join(methods),
        )


def plan_run(args: argparse.Namespace) -> Plan:
    """Check every argument and the data; raise UsageError with a one-line reason."""
    if args.init not in LORA_INITS:
        raise UsageError(f"unknown --init {args.init!r}; valid: {', '.join(LORA_INITS)}")
    try:
        compressions = build_configs(
            unique(args.methods),
            args.preset,
            block=parse_block(args.block) if args.block else None,
            keep=args.keep,
            scale=args.int1_scale,
            int_scale=args.int_scale,
            quantizer=args.quantizer,
            pattern=args.nm,
        )
        fractions = SplitFractions(*args.split)
        TrainConfig(objective=args.objective, kd_temperature=args.kd_temperature,
                    kd_weight=args.kd_weight)  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from error
    check_numbers(args)
    device = resolve_device(args.device)
    demo, reason, source, model, weights = resolve_data_and_model(args)
    data_name = "digits" if demo else folder_name(Path(source.root).resolve().name)
    if args.storage is not None and args.worker_of is None:
        from train_evaluate.search.storage import check_storage

        problem = check_storage(args.storage)
        if problem is not None:
            raise UsageError(f"{problem}; check the URL, that the server runs, and the user")
    network_plan = plan_network(args, model, source, fractions, device)
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
    if network_plan is not None and network_plan.calibration == "asymmetric":
        from lora.inits import ACTIVATION_AWARE_INITS, compresses_target

        if args.init not in ACTIVATION_AWARE_INITS and not any(
            compresses_target(config) for config in compressions.values()
        ):
            raise UsageError(
                f"--calibration asymmetric changes only the fits of "
                f"{' and '.join(ACTIVATION_AWARE_INITS)} and the rounding of --quantizer gptq; "
                f"with --init {args.init} and --methods {' '.join(compressions)} it would change "
                "nothing: drop it, or choose one of those"
            )
    if network_plan is None and args.reconstruct != "none":
        raise UsageError(
            "--reconstruct trains adapters to reproduce the uncompressed network block by "
            "block; with the classifier alone there is one layer and no block: drop it or "
            "select more --layers"
        )
    learned = [m for m, c in compressions.items() if getattr(c, "quantizer", "") == "adaround"]
    if learned and (network_plan is None or not network_plan.reconstruction.enabled):
        raise UsageError(
            "--quantizer adaround learns each weight's rounding inside the block "
            "reconstruction: add --reconstruct block (or network) and select --layers"
        )
    check_budget(args, network_plan)
    run_name = args.init
    if network_plan is not None:
        run_name += f"_layers-{selection_name(network_plan.selection)}"
        if network_plan.calibration != "symmetric":
            run_name += f"_{network_plan.calibration}"
        if network_plan.reconstruction.enabled:
            run_name += f"_reconstruct-{network_plan.reconstruction.mode}"
    if args.search == "pareto":
        run_name += "_pareto"
    out = args.out or args.results_dir / folder_name(model) / data_name / run_name
    cache_dir = args.cache_dir or args.results_dir / "cache"
    check_folders(args, out, cache_dir)
    try:
        fractions.sizes(len(source.ids))  # unreadable images can only make it smaller later
        fc_shape = classifier_shape(model)
    except (ValueError, BackboneError) as error:
        raise UsageError(str(error)) from error
    if not demo:
        check_imagenet_head(model, fc_shape[0])
    rank_shape = fc_shape if network_plan is None else largest_layer(model, network_plan.layers)
    ranks, skipped = choose_ranks(args.ranks, rank_shape, model, network_plan is not None)
    if network_plan is not None and network_plan.bits_budgets:
        check_budgets_reachable(model, network_plan, compressions, ranks, args)
    backbone = None if demo else load_backbone(model, weights, device)
    # only once every check has passed (a refused run gets its one error line alone), and
    # not again in each worker: its launcher warned
    if args.worker_of is None:
        warn_unused_options(args, compressions)
    return Plan(
        demo=demo,
        demo_reason=reason,
        source=source,
        data_name=data_name,
        model=model,
        weights=weights,
        backbone=backbone,
        ranks=ranks,
        default_ranks_skipped=skipped,
        fc_shape=fc_shape,
        compressions=compressions,
        sweep=sweep_config(args),
        fractions=fractions,
        device=device,
        threads=args.threads or available_cores(),
        feature_batch_size=args.feature_batch_size,
        decode_workers=args.decode_workers,
        adapter_dtype=args.adapter_dtype,
        include_bias=args.include_bias,
        results_dir=args.results_dir,
        out=out,
        cache_dir=cache_dir,
        overwrite=args.overwrite,
        network=network_plan,
        decode=args.decode,
        search=args.search,
        storage=args.storage,
        study_prefix=args.study_prefix,
        workers=args.workers,
        worker_threads=args.threads or max(1, available_cores() // args.workers),
        share=args.share,
        heartbeat=args.heartbeat,
        worker_of=args.worker_of,
        argv=tuple(args.argv),
        options=dump_options(args),
    )


def largest_layer(model: str, names: tuple[str, ...]) -> tuple[int, int]:
    """The (out, in*kh*kw) matrix of the selected layer that can hold the largest rank."""
    with torch.device("meta"):
        bare = timm.create_model(model, pretrained=False)
    shapes = [tuple(bare.get_submodule(n).weight.flatten(1).shape) for n in names]
    return max(shapes, key=min)


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
        net = plan.network
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
