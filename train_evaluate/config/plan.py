"""The driver's arguments checked into a ``Plan``: everything a run needs, before any work.

Every check that can fail does so here, with a one-line ``UsageError``, before a file or folder
is written: unknown names, impossible numbers, unwritable folders, missing data, a model whose
head does not predict ImageNet-1k classes, weights that do not load into the model.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from data import DataError, SplitFractions, load_digits_source, scan_imagenet_folder
from lora import LORA_INITS
from lora.inits import DEFAULT_FIT, FitConfig
from lora.plan import LayerPlan
from train_evaluate.config.cli import (
    UsageError,
    available_cores,
    resolve_device,
)
from train_evaluate.config.compressions import (
    compression_configs,
    layer_plan_and_configs,
    warn_unused_options,
)
from train_evaluate.config.network_plan import (
    NetworkPlan,
    check_budget,
    check_budgets_reachable,
    check_network_options,
    fit_config,
    largest_layer,
    plan_network,
    run_name,
)
from train_evaluate.config.options import dump_options
from train_evaluate.config.run_options import DEFAULT_DATA, DEFAULT_MODEL, DEFAULT_RANKS, RunOptions
from train_evaluate.inputs.backbone import (
    BackboneError,
    check_model_name,
    classifier_shape,
    create_backbone,
)
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
    fit: FitConfig = DEFAULT_FIT  # --fit-ridge, --asymmetric-strength

    @property
    def models(self) -> int:
        """The (method, rank) models the run builds: every method at every rank (none with
        --budget-only), and one per --bits-budget; a --layer-plan with a choice per layer
        builds one."""
        if self.network is None:
            return len(self.compressions) * len(self.ranks)
        if self.network.layer_plan is not None:
            return 1
        uniform = 0 if self.network.budget_only else len(self.compressions) * len(self.ranks)
        return uniform + len(self.network.bits_budgets)

    @property
    def shared(self) -> bool:
        """Whether other processes may work on the same studies: then nothing running may be
        taken for dead at start, and trials beat a heartbeat."""
        return self.storage is not None or self.workers > 1 or self.worker_of is not None


def unique(values) -> list:
    return list(dict.fromkeys(values))


def check_numbers(args: RunOptions) -> None:
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
    if args.ranks is not None and min(args.ranks) < 0:
        raise UsageError(f"--ranks must be at least 0 (0: no adapter); got {min(args.ranks)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1; got {args.threads}")
    if args.calib_images < 1 or args.calib_augment < 1:
        raise UsageError(
            "--calib-images and --calib-augment must be at least 1; got "
            f"{args.calib_images} and {args.calib_augment}"
        )
    if not (args.cache_limit > 0 and math.isfinite(args.cache_limit)):
        raise UsageError(f"--cache-limit must be a positive number of GB; got {args.cache_limit}")


def check_folders(args: RunOptions, out: Path, cache_dir: Path) -> None:
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


def resolve_data_and_model(args: RunOptions) -> tuple[bool, str, Any, str, Path | None]:
    """(demo?, why the demo, image source, model name, weights file) for these arguments."""
    data_dir = args.data_dir or DEFAULT_DATA
    demo = args.demo or (args.data_dir is None and not DEFAULT_DATA.exists())
    if demo:
        if args.model or args.weights:
            raise UsageError(
                f"--model/--weights need ImageNet images: pass --data-dir (none at {DEFAULT_DATA})"
            )
        reason = "--demo" if args.demo else f"no ImageNet folder at {DEFAULT_DATA}"
        try:
            return True, reason, load_digits_source(), DEMO_MODEL, None
        except DataError as error:
            raise UsageError(str(error)) from None
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
            f"{model}: ranks must be between 0 (no adapter) and {limit}"
        )
    return ranks, ()


def sweep_config(args: RunOptions) -> SweepConfig:
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


def ranks_and_configs(
    args: RunOptions,
    model: str,
    fc_shape: tuple[int, int],
    network_plan: NetworkPlan | None,
    planned: LayerPlan | None,
    compressions: dict[str, Any],
) -> tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]:
    """(ranks to run, default ranks left out, the configs they run with). A ``--layer-plan``
    runs one model: its layers' own ranks (the row names the largest), or one (method, rank)
    cell, its method alone."""
    rank_shape = fc_shape if network_plan is None else largest_layer(model, network_plan.layers)
    requested = args.ranks
    if planned is not None:
        requested = [planned.rank]
        if network_plan is None or network_plan.layer_plan is None:  # a (method, rank) cell
            compressions = {planned.uniform.method: compressions[planned.uniform.method]}
    ranks, skipped = choose_ranks(requested, rank_shape, model, network_plan is not None)
    return ranks, skipped, compressions


def check_storage_reachable(url: str) -> None:
    from train_evaluate.search.storage import check_storage

    problem = check_storage(url)
    if problem is not None:
        raise UsageError(f"{problem}; check the URL, that the server runs, and the user")


def plan_run(args: RunOptions, argv: Sequence[str] = ()) -> Plan:
    """Check every argument and the data; raise UsageError with a one-line reason."""
    if args.init not in LORA_INITS:
        raise UsageError(f"unknown --init {args.init!r}; valid: {', '.join(LORA_INITS)}")
    compressions = compression_configs(args) if args.layer_plan is None else {}
    try:
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
        check_storage_reachable(args.storage)
    planned, compressions = layer_plan_and_configs(args, model, compressions)
    network_plan = plan_network(args, model, source, fractions, device, planned)
    check_network_options(args, network_plan, compressions)
    check_budget(args, network_plan)
    name = run_name(args, network_plan)
    out = args.out or args.results_dir / folder_name(model) / data_name / name
    cache_dir = args.cache_dir or args.results_dir / "cache"
    check_folders(args, out, cache_dir)
    try:
        fractions.sizes(len(source.ids))  # unreadable images can only make it smaller later
        fc_shape = classifier_shape(model)
    except (ValueError, BackboneError) as error:
        raise UsageError(str(error)) from error
    if not demo:
        check_imagenet_head(model, fc_shape[0])
    ranks, skipped, compressions = ranks_and_configs(
        args, model, fc_shape, network_plan, planned, compressions
    )
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
        argv=tuple(argv),
        options=dump_options(args),
        fit=fit_config(args),
    )
