"""Compress a pretrained classifier's final layer, recover it with LoRA, sweep ranks with Optuna.

    python train_evaluate/train_model.py --init svd_init

With an ImageNet folder (one subfolder per synset, default ../archive/imagenet_validation) this
runs the study on a timm model (default resnet18.tv_in1k). Without one it runs the offline demo
on scikit-learn's digits. See README.md for every option and output.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import fcntl
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import optuna
import timm
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from compression import (
    StorageCost,
    account_layer,
    build_configs,
    list_methods,
    model_ratio,
    parse_block,
)
from compression.binary import INT1_SCALES
from compression.sparse import KEEP_RULES
from data import (
    DataError,
    SplitFractions,
    load_digits_source,
    scan_imagenet_folder,
    split_indices,
    split_lists,
)
from lora import LORA_INITS
from train_evaluate import compare, interrupt, report
from train_evaluate.backbone import (
    BackboneError,
    check_model_name,
    classifier,
    classifier_shape,
    tensor_bits,
)
from train_evaluate.checkpoint import ADAPTER_DTYPES, read_packed
from train_evaluate.demo import DEMO_MODEL, demo_weights
from train_evaluate.features import (
    BackboneFeatures,
    backbone_features,
    default_workers,
    feature_key,
)
from train_evaluate.files import check_writable, read_json, write_json, write_text
from train_evaluate.sweep import (
    Method,
    SearchSpace,
    Splits,
    SweepConfig,
    open_storage,
    run_rank,
    steps_per_rank,
)
from train_evaluate.training import OBJECTIVES, FeatureSplit, TrainConfig, evaluate, linear_logits

log = logging.getLogger("train_model")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "archive" / "imagenet_validation"
DEFAULT_RESULTS = REPO / "results"
DEFAULT_MODEL = "resnet18.tv_in1k"
DEFAULT_RANKS = (2, 4, 8, 16, 32, 64, 128)


class UsageError(Exception):
    """A bad argument or input: reported as one line, exit code 2, before any work."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="train_model.py",
        description="Compress the classifier's last layer, recover it with a LoRA adapter per "
        "rank (Optuna-tuned), and report accuracy against honest compression ratios.",
    )
    study = parser.add_argument_group("study")
    study.add_argument(
        "--init",
        default="paper_init",
        help=f"adapter init: {', '.join(LORA_INITS)} (default: paper_init)",
    )
    study.add_argument(
        "--methods",
        nargs="+",
        default=["sparse", "int1"],
        help=f"compression methods: {', '.join(list_methods())} (default: sparse int1)",
    )
    study.add_argument(
        "--ranks",
        nargs="+",
        type=int,
        help="LoRA ranks (default: 2 4 8 16 32 64 128, keeping those that fit the layer)",
    )
    study.add_argument("--trials", type=int, default=10, help="Optuna trials per rank")
    study.add_argument(
        "--epochs", type=int, default=10, help="epochs per training run; 0 = init only, no search"
    )
    study.add_argument("--seed", type=int, default=0, help="seed of the split, search, training")
    study.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=(0.64, 0.16, 0.20),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions (default: 0.64 0.16 0.20)",
    )
    study.add_argument(
        "--lr-range",
        nargs=2,
        type=float,
        default=(1e-4, 1e-2),
        metavar=("LOW", "HIGH"),
        help="learning-rate search range, log-uniform",
    )
    study.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512], help="batch sizes"
    )
    study.add_argument(
        "--alphas", nargs="+", type=int, default=[8, 16, 24, 32, 40, 48], help="LoRA alphas"
    )
    study.add_argument(
        "--final-seeds",
        type=int,
        default=1,
        help="final models per rank, each with its own seed: mean, std and 95%% interval",
    )
    study.add_argument(
        "--no-pruning", action="store_true", help="run every Optuna trial to its last epoch"
    )
    study.add_argument("--dora", action="store_true", help="DoRA: also train a magnitude vector")
    study.add_argument(
        "--loftq-iters", type=int, default=5, help="alternations of loftq_init / act_loftq_init"
    )
    study.add_argument(
        "--objective",
        default="ce",
        choices=OBJECTIVES,
        help="ce: labels; kd: distil the uncompressed layer (train labels unused); ce+kd: both",
    )
    study.add_argument("--kd-temperature", type=float, default=2.0, help="distillation temperature")
    study.add_argument("--kd-weight", type=float, default=0.5, help="weight of kd in ce+kd (0..1)")

    compress_group = parser.add_argument_group("compression")
    compress_group.add_argument(
        "--preset",
        default="default",
        help="default (4x4 absmax, int1 row scale) or seed-compat (the original code's choices)",
    )
    compress_group.add_argument("--block", help="sparse block shape HxW, e.g. 4x4 or 1x16")
    compress_group.add_argument("--keep", help=f"sparse keep rule: {', '.join(KEEP_RULES)}")
    compress_group.add_argument("--int1-scale", help=f"int1 scale: {', '.join(INT1_SCALES)}")
    compress_group.add_argument("--nm", help="N:M pattern of the nm method (default: 2:4)")
    compress_group.add_argument(
        "--adapter-dtype",
        default="fp32",
        choices=list(ADAPTER_DTYPES),
        help="dtype of the adapter in the packed checkpoint and the ratios (training is fp32)",
    )
    compress_group.add_argument(
        "--include-bias",
        action="store_true",
        help="count the (uncompressed) bias on both sides of the ratios",
    )

    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--data-dir",
        type=Path,
        help=f"ImageNet folder, one subfolder per synset (default: {DEFAULT_DATA})",
    )
    data.add_argument(
        "--demo", action="store_true", help="run the offline digits demo even if ImageNet exists"
    )
    data.add_argument("--model", help=f"timm model name (default: {DEFAULT_MODEL})")
    data.add_argument("--weights", type=Path, help="local weights file (state dict) for --model")
    data.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    data.add_argument("--feature-batch-size", type=int, default=64, help="images per forward pass")
    data.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image decoding processes (default: 0 on CPU, decoding in threads; up to 8 on GPU)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS,
        help="where runs and the feature cache go (default: results/ in the repository)",
    )
    output.add_argument(
        "--out", type=Path, help="this run's folder (default: <results-dir>/<init>)"
    )
    output.add_argument(
        "--cache-dir", type=Path, help="feature cache (default: <results-dir>/cache)"
    )
    return parser


@dataclass(frozen=True)
class Plan:
    """Validated arguments: everything the run needs, checked before any work starts."""

    args: argparse.Namespace
    demo: bool
    source: Any
    model: str
    weights: Path | None
    ranks: tuple[int, ...]
    fc_shape: tuple[int, int]
    compressions: dict[str, Any]
    sweep: SweepConfig
    fractions: SplitFractions
    device: torch.device
    out: Path
    cache_dir: Path


def unique(values) -> list:
    return list(dict.fromkeys(values))


def plan_run(args: argparse.Namespace) -> Plan:
    """Check every argument and the data; raise UsageError with a one-line reason."""
    if args.init not in LORA_INITS:
        raise UsageError(f"unknown --init {args.init!r}; valid: {', '.join(LORA_INITS)}")
    try:
        block = parse_block(args.block) if args.block else None
        compressions = build_configs(
            unique(args.methods),
            args.preset,
            block=block,
            keep=args.keep,
            scale=args.int1_scale,
            pattern=args.nm,
        )
        fractions = SplitFractions(*args.split)
        TrainConfig(objective=args.objective, kd_temperature=args.kd_temperature,
                    kd_weight=args.kd_weight)  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from error
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1; got {args.trials}")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be 0 (init only) or more; got {args.epochs}")
    if args.final_seeds < 1 or args.loftq_iters < 1:
        raise UsageError("--final-seeds and --loftq-iters must be at least 1")
    low, high = args.lr_range
    if not (0 < low <= high and math.isfinite(high)):
        raise UsageError(f"--lr-range needs 0 < LOW <= HIGH; got {low:g} {high:g}")
    if min(args.batch_sizes) < 1 or min(args.alphas) < 1:
        raise UsageError("--batch-sizes and --alphas must be positive integers")
    if args.feature_batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise UsageError("--feature-batch-size must be >= 1 and --workers >= 0")
    if args.ranks is not None and min(args.ranks) < 1:
        raise UsageError(f"--ranks must be at least 1; got {min(args.ranks)}")
    device = resolve_device(args.device)

    out = args.out or args.results_dir / args.init
    cache_dir = args.cache_dir or args.results_dir / "cache"
    for folder, flag in ((out, "--out"), (cache_dir, "--cache-dir")):
        problem = check_writable(folder)
        if problem:
            raise UsageError(f"cannot write {flag} {folder}: {problem}")

    demo, source, model, weights = resolve_data_and_model(args)
    try:
        fractions.sizes(len(source.ids))  # unreadable images can only make it smaller later
    except ValueError as error:
        raise UsageError(str(error)) from error
    try:
        out_features, in_features = classifier_shape(model)
    except BackboneError as error:
        raise UsageError(str(error)) from error
    limit = min(out_features, in_features)
    if args.ranks is None:
        ranks = tuple(r for r in DEFAULT_RANKS if r <= limit)
        if not ranks:
            raise UsageError(f"no default rank fits the {out_features} x {in_features} classifier")
    else:
        ranks = tuple(sorted(unique(args.ranks)))
        if max(ranks) > limit:
            raise UsageError(
                f"rank {max(ranks)} does not fit the {out_features} x {in_features} classifier of "
                f"{model}: ranks must be between 1 and {limit}"
            )
    sweep = SweepConfig(
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
            lr=(low, high),
            batch_sizes=tuple(unique(args.batch_sizes)),
            alphas=tuple(unique(args.alphas)),
        ),
    )
    return Plan(
        args,
        demo,
        source,
        model,
        weights,
        ranks,
        (out_features, in_features),
        compressions,
        sweep,
        fractions,
        device,
        out,
        cache_dir,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_data_and_model(args: argparse.Namespace):
    """(demo?, image source, model name, weights file) for these arguments."""
    data_dir = args.data_dir or DEFAULT_DATA
    demo = args.demo or (args.data_dir is None and not DEFAULT_DATA.exists())
    if demo:
        if args.model or args.weights:
            raise UsageError(
                f"--model/--weights need ImageNet images: pass --data-dir (none at {DEFAULT_DATA})"
            )
        return True, load_digits_source(), DEMO_MODEL, None
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
    return False, source, model, args.weights


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("timm", "optuna", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Optuna logs a trial's exception with its traceback; ours are reported in one line (Ctrl-C)
    # or propagate (bugs), so its own log stays quiet.
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def announce(plan: Plan) -> None:
    if plan.demo:
        why = "--demo" if plan.args.demo else f"no ImageNet folder at {DEFAULT_DATA}"
        log.info(
            "DEMO RUN (%s): the offline demo on scikit-learn's digits with a small ViT trained "
            "here. For the real study, put the ImageNet validation folders (one per synset) at "
            "%s or pass --data-dir.",
            why,
            DEFAULT_DATA,
        )
    log.info("data: %s", plan.source.description)
    log.info(
        "model: %s (classifier %d x %d), device %s",
        plan.model,
        *plan.fc_shape,
        plan.device,
    )
    if plan.args.ranks is None and len(plan.ranks) < len(DEFAULT_RANKS):
        skipped = [r for r in DEFAULT_RANKS if r not in plan.ranks]
        log.info("ranks %s do not fit this classifier; running %s", skipped, list(plan.ranks))
    sweep = plan.sweep
    log.info(
        "study: init %s%s, methods %s, ranks %s, %d trials x %d epochs, objective %s, "
        "%d final seed(s), seed %d -> %s",
        sweep.init,
        " + DoRA" if sweep.use_dora else "",
        ", ".join(c.describe() for c in plan.compressions.values()),
        list(plan.ranks),
        sweep.trials,
        sweep.epochs,
        sweep.objective,
        sweep.final_seeds,
        sweep.seed,
        plan.out,
    )
    if sweep.epochs == 0:
        log.info("--epochs 0: every rank is the init only (no Optuna search, no training)")


def load_features(plan: Plan) -> tuple[BackboneFeatures, Path | None, dict]:
    """Backbone -> cached features (one pass per image, reused across runs) and the split."""
    args = plan.args
    weights = plan.weights
    if plan.demo:
        # The demo classifier trains on the train split, so the split is drawn first; it is the
        # same split that is drawn below from the (identical) list of readable digits.
        split = split_indices(len(plan.source.ids), plan.fractions, plan.sweep.seed)
        weights = demo_weights(plan.cache_dir, plan.source, split["train"], plan.sweep.seed)
    workers = args.workers if args.workers is not None else default_workers(plan.device)
    try:
        found = backbone_features(
            plan.model, weights, plan.source, plan.device, plan.cache_dir,
            args.feature_batch_size, workers,
        )  # fmt: skip
        split = split_indices(len(found.cached.ids), plan.fractions, plan.sweep.seed)
    except (BackboneError, ValueError) as error:  # bad weights; a split emptied by skipped images
        raise UsageError(str(error)) from error
    if found.cached.skipped:
        log.warning("the unreadable images are listed in run.json")
    return found, weights, split


def dense_cost(out_features: int, in_features: int) -> StorageCost:
    """The uncompressed fp32 layer, in the same terms as a compressor's cost."""
    weights = out_features * in_features
    return StorageCost(value_bits=weights * 32, index_bits=0, scale_bits=0, macs=weights)


def split_tensors(cached, split, plan: Plan, head: nn.Module) -> Splits:
    """The cached features cut into train / val / test on the run's device.

    With a distillation objective each row carries the uncompressed layer's logits (computed
    once); with ``kd`` alone the train split carries no labels at all, so no code path can read
    them.
    """
    features, labels = cached.features.to(plan.device), cached.labels.to(plan.device)
    objective = plan.sweep.objective
    teacher = linear_logits(head, features) if objective != "ce" else None

    def part(name: str, hide_labels: bool = False) -> FeatureSplit:
        index = split[name]
        return FeatureSplit(
            features[index],
            None if hide_labels else labels[index],
            teacher_logits=None if teacher is None else teacher[index],
        )

    return Splits(part("train", hide_labels=objective == "kd"), part("val"), part("test"))


@dataclass
class Context:
    """What every method of a run shares once the features are in."""

    plan: Plan
    head: nn.Linear
    splits: Splits
    original_acc: float
    backbone_bits: int
    features_key: str
    test_ids_sha256: str
    weights: Path | None
    storage: optuna.storages.BaseStorage
    bar: tqdm

    @property
    def dense_bytes(self) -> int:
        """The uncompressed FC, weight and bias, at fp32: what ``ratio_file`` divides."""
        out_features, in_features = self.plan.fc_shape
        return 4 * (out_features * in_features + out_features)


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold ``out/.lock`` for the run: two runs writing one folder would fail each other's
    Optuna trials (a resume marks trials left running as failed) and mix their files. The
    operating system releases the lock when the process ends, killed or not."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise UsageError(
                f"another run is writing to {out}; wait for it to finish or choose another --out"
            ) from error
        yield


def run(plan: Plan) -> None:
    with exclusive(plan.out):
        run_locked(plan)


def run_locked(plan: Plan) -> None:
    announce(plan)
    started = time.perf_counter()
    found, weights, split = load_features(plan)
    model, key, cached, reused = found.model, found.key, found.cached, found.reused
    out = plan.out
    lists = split_lists(cached.ids, split)
    for name, text in lists.items():
        write_text(out / "split" / f"{name}.txt", text)
    head = classifier(model)
    splits = split_tensors(cached, split, plan, head)
    original_acc = evaluate(head, splits.test)["acc"]
    log.info(
        "original classifier: test top-1 %.2f%% (%d test images)", original_acc, len(splits.test)
    )
    storage = open_storage(out / "optuna.sqlite3")
    total = len(plan.compressions) * len(plan.ranks) * steps_per_rank(plan.sweep)
    rows: list[dict[str, Any]] = []
    with (
        logging_redirect_tqdm(),
        tqdm(total=total, desc="sweep", unit="run", disable=None) as bar,
    ):
        context = Context(
            plan, head, splits, original_acc, tensor_bits(model) - tensor_bits(head), key,
            hashlib.sha256(lists["test"].encode()).hexdigest(), weights, storage, bar,
        )  # fmt: skip
        for name, compression in plan.compressions.items():
            rows.extend(method_rows(context, name, compression))
    frame = report.evaluation_frame(rows)
    csv_path = report.write_evaluation(out, frame)
    title = f"{plan.model}, {plan.sweep.init}" + (" (digits demo)" if plan.demo else "")
    report.save_figure(report.plot_summary(frame, title), out / "accuracy_vs_rank.png")
    write_json(
        out / "run.json",
        {
            "demo": plan.demo,
            "data": plan.source.description,
            "model": plan.model,
            "weights": str(weights) if weights else "hub",
            "feature_key": key,
            "features_from_cache": reused,
            "images": len(cached.ids),
            "skipped_images": len(cached.skipped),
            "skipped_image_ids": list(cached.skipped),
            "split_sizes": {n: len(split[n]) for n in split},
            "compressions": {n: c.describe() for n, c in plan.compressions.items()},
            "sweep": asdict(plan.sweep),
            "device": str(plan.device),
            "versions": {
                "torch": torch.__version__,
                "timm": timm.__version__,
                "optuna": optuna.__version__,
            },
            "seconds": time.perf_counter() - started,
        },
    )
    comparison = compare.write_report(out.parent)
    log.info(
        "\n%s",
        frame[["quant", "lora_rank", "evaluation", "init_only", "ratio", "ratio_seed"]].to_string(
            index=False, float_format=lambda v: f"{v:.2f}"
        ),
    )
    log.info("wrote %s and the plots, checkpoints and Optuna pages beside it", csv_path)
    if comparison:
        log.info("comparison of every run in %s: %s", out.parent, comparison[1])
    if plan.demo:
        log.info("(these are demo numbers on digits, not ImageNet; see README for the real study)")


def method_rows(context: Context, name: str, compression: Any) -> list[dict[str, Any]]:
    """The ``original`` and ``quantized`` rows of one method, then one row per rank."""
    plan, head, splits = context.plan, context.head, context.splits
    method = Method.create(name, compression, head, splits.train.features)
    compressed_acc = evaluate(method.compressed_linear(), splits.test)["acc"]
    log.info("%s: compressed only, test top-1 %.2f%%", compression.describe(), compressed_acc)
    shared = {
        "quant": name,
        "init": plan.sweep.init,
        "seed": plan.sweep.seed,
        "compression": compression.describe(),
        "status": "ok",
    }
    rows = []
    for lora_rank, cost, acc in (
        ("original", dense_cost(*plan.fc_shape), context.original_acc),
        ("quantized", method.cost, compressed_acc),
    ):
        rows.append(
            {**shared, "lora_rank": lora_rank, "evaluation": acc,
             "drop": context.original_acc - acc, **accounting(context, cost, 0)}
        )  # fmt: skip
    for rank in plan.ranks:
        record = run_or_resume(context, method, rank)
        rows.append(
            {
                **report.rank_row(record, context.original_acc, context.dense_bytes),
                **accounting(context, method.cost, rank),
            }
        )
    return rows


def accounting(context: Context, cost: StorageCost, rank: int) -> dict[str, Any]:
    """The ratio columns of a row: this layer, and the whole model around it."""
    plan = context.plan
    layer = account_layer(
        *plan.fc_shape,
        cost,
        rank,
        adapter_dtype_bits=ADAPTER_DTYPES[plan.args.adapter_dtype].itemsize * 8,
        extra_adapter_params=plan.fc_shape[0] if plan.sweep.use_dora and rank else 0,
        include_bias=plan.args.include_bias,
    )
    return report.accounting_columns(layer, model_ratio(context.backbone_bits, layer))


def run_or_resume(context: Context, method: Method, rank: int) -> dict[str, Any]:
    """A rank's record: reused when a finished one with the same key exists, else computed."""
    plan = context.plan
    sweep = asdict(plan.sweep)
    # The study depends on everything but the trial count (a study can be extended) and the
    # number of final models; the record depends on those too.
    study_identity = {k: v for k, v in sweep.items() if k not in ("trials", "final_seeds")}
    identity = {
        "features": context.features_key,
        "split": asdict(plan.fractions),
        "compression": method.config.describe(),
        "sweep": study_identity,
        # Training runs on another device draw other random numbers (paper_init's A) and sum in
        # another order: a study is not continued across devices.
        "device": plan.device.type,
    }
    study_name = f"{method.name}_r{rank}_{feature_key(**identity)[:12]}"
    key = feature_key(
        study=study_name,
        trials=plan.sweep.trials,
        finals=plan.sweep.final_seeds,
        adapter_dtype=plan.args.adapter_dtype,
    )
    path = plan.out / "records" / f"{method.name}_r{rank}.json"
    record = read_json(path)
    if record is not None and record.get("key") == key:
        log.info("%s r=%d: finished in an earlier run; reusing its results", method.name, rank)
        context.bar.update(steps_per_rank(plan.sweep))
        return record
    outcome = run_rank(
        method, rank, context.splits, plan.sweep, context.storage, study_name, context.bar.update
    )
    record = {**outcome.record, "key": key}
    info = {
        "model": plan.model,
        "weights": str(context.weights.resolve()) if context.weights else "hub",
        "demo": plan.demo,
        "data_dir": None if plan.demo else str(plan.source.root.resolve()),
        "feature_key": context.features_key,
        "test_ids_sha256": context.test_ids_sha256,
    }
    checkpoint = report.write_rank_artifacts(
        plan.out, record, outcome.layer, outcome.study, plan.args.adapter_dtype, info
    )
    if checkpoint is not None:
        # Read the file back and score the model it holds: the number a user of the file gets.
        rebuilt = read_packed(checkpoint, plan.device).layer
        test = context.splits.test.with_base(rebuilt)
        record["file"] = {
            "bytes": checkpoint.stat().st_size,
            "test_acc": evaluate(rebuilt, test)["acc"],
        }
    write_json(path, record)  # last: a record on disk means the rank's files are complete
    summary = "no final model" if record["test_acc"] is None else f"test {record['test_acc']:.2f}%"
    log.info(
        "%s r=%d: %s (init only %.2f%%) in %.1f s",
        method.name,
        rank,
        summary,
        record["init_only"]["test_acc"],
        record["seconds"],
    )
    return record


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        with interrupt.deferred():
            args = build_parser().parse_args(argv)
            plan = plan_run(args)
            run(plan)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
