"""Command-line plumbing shared by the scripts: one-line errors, logging, the device.

Kept free of torch, timm and optuna at import time, so that ``--help`` and argument errors
answer at once; the heavy libraries are imported only once the arguments are known good.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from train_evaluate.config.run_options import DEFAULT_DATA, DEFAULT_MODEL, RunOptions
from train_evaluate.runtime.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError (one line) instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


# --reconstruct's numeric settings: (flag, type, metavar, what it sets); the default is added
RECONSTRUCT_SETTINGS = (
    ("--reconstruct-steps", int, "N", "Adam steps per block"),
    ("--reconstruct-network-steps", int, "N", "Adam steps of --reconstruct network's last stage"),
    ("--reconstruct-lr", float, "LR", "the reconstruction's Adam learning rate"),
    ("--reconstruct-batch", int, "N", "calibration images per reconstruction step"),
    ("--reconstruct-held-out", float, "SHARE", "share of the calibration views no step trains "
     "on, which alone decide whether a block keeps its trained state"),
    ("--reconstruct-drop", float, "P", "QDrop: each value of a block's input taken from the "
     "clean network with probability P during reconstruction, else from the compressed prefix"),
    ("--rounding-weight", float, "W", "the weight of learned rounding's regulariser"),
    ("--rounding-lr", float, "LR", "Adam's learning rate for the rounding logits"),
)  # fmt: skip


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("timm", "optuna", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_device(name: str):
    """``auto``: CUDA when present, else the CPU. Imports torch (call after parsing)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


# Names the help lists. The registries they must equal live in modules that import torch;
# tests/test_cli.py checks that these match them, and plan.py validates against the registries.
INIT_NAMES = ("paper_init", "svd_init", "act_svd_init", "loftq_init", "act_loftq_init")
INT_GRID_NAMES = ("symmetric", "full", "affine")
# intN on the default grid, then each width on the other grids under its own name (int3-affine)
INT_METHODS = tuple(
    f"int{bits}" + ("" if grid == "symmetric" else f"-{grid}")
    for grid in INT_GRID_NAMES
    for bits in range(2, 9)
)
METHOD_NAMES = ("int1", *INT_METHODS, "sparse", "nm")
PRESET_NAMES = ("default", "seed-compat")
KEEP_NAMES = ("absmax", "max")
INT1_SCALE_NAMES = ("none", "tensor", "row", "rowcol")
# INT_METHODS: the methods the int options apply to (a test holds them equal to the registry's
# methods with those fields)
INT_SCALE_NAMES = ("max", "mse")
SCALE_DTYPE_NAMES = ("fp32", "fp16")
QUANTIZER_NAMES = ("rtn", "gptq", "adaround", "gptq-adaround")
ADAPTER_DTYPE_NAMES = ("fp32", "fp16", "bf16", "int8", "int4")
OBJECTIVE_NAMES = ("ce", "kd", "ce+kd")

EXAMPLES = """\
examples:
  # the offline demo (digits) when no ImageNet folder is present; the study otherwise
  python train_evaluate/train_model.py --init svd_init
  # real ImageNet weights that install offline, on a folder of ImageNet images
  python train_evaluate/train_model.py --init svd_init --model tf_efficientnet_lite0 \\
      --weights weights/tf_efficientnet_lite0.safetensors --data-dir ../shared/imagenet-sample
"""


def decode_mode(value: str) -> str:
    """``--decode``: ``gpu`` is refused while parsing (one line, exit code 2, before any work)
    when no CUDA device is available. Imports torch only for ``gpu``."""
    if value not in ("cpu", "gpu"):
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from cpu, gpu)")
    if value == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("gpu needs a CUDA device, and none is available")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The driver's options; building it imports nothing heavy (``--help`` answers at once)."""
    parser = OneLineParser(
        prog="train_model.py",
        description="Compress the classifier's last layer, recover it with a LoRA adapter per "
        "rank (Optuna-tuned), and report accuracy against honest compression ratios.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study = parser.add_argument_group("study")
    study.add_argument(
        "--init",
        help=f"adapter init: {', '.join(INIT_NAMES)} (default: paper_init)",
    )
    study.add_argument(
        "--fit-ridge",
        type=float,
        metavar="R",
        help="act_svd_init / act_loftq_init and --calibration asymmetric: the floor added to "
        "the eigenvalues of the inputs' second moment, relative to their mean (more for a layer "
        "fitted on few rows, e.g. the FC on one row per image; default: 1e-4)",
    )
    study.add_argument(
        "--methods",
        nargs="+",
        help="compression methods: int1, int2 ... int8 (--int-grid's grid), int2-full ... "
        "int8-full, int2-affine ... int8-affine (that grid, whatever --int-grid says), sparse, "
        "nm (default: sparse int1)",
    )
    study.add_argument(
        "--ranks",
        nargs="+",
        type=int,
        help="LoRA ranks; 0: no adapter (default: 2 4 8 16 32 64 128, keeping those that fit "
        "the layer)",
    )
    study.add_argument("--trials", type=int, help="Optuna trials per rank (default: 10)")
    study.add_argument(
        "--search",
        choices=("rank", "pareto"),
        help="rank: one Optuna study per (method, rank) (default); pareto: one multi-objective "
        "study over method, rank and training settings, val accuracy against stored bits, "
        "with --trials trials in all (pareto.csv)",
    )
    study.add_argument(
        "--epochs",
        type=int,
        help="epochs per training run; 0 = init only, no search (default: 10)",
    )
    study.add_argument("--seed", type=int, help="seed of the split, search, training (default: 0)")
    study.add_argument(
        "--split",
        nargs=3,
        type=float,
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions (default: 0.64 0.16 0.20)",
    )
    study.add_argument(
        "--lr-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="learning-rate search range, log-uniform (default: 1e-4 1e-2)",
    )
    study.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        help="batch sizes searched (default: 32 64 128 256 512)",
    )
    study.add_argument(
        "--alphas",
        nargs="+",
        type=int,
        help="LoRA alphas searched (default: 8 16 24 32 40 48)",
    )
    study.add_argument(
        "--final-seeds",
        type=int,
        help="final models per rank, each with its own seed: mean, std and 95%% interval "
        "(default: 1)",
    )
    study.add_argument(
        "--no-pruning", action="store_true", help="run every Optuna trial to its last epoch"
    )
    study.add_argument("--dora", action="store_true", help="DoRA: also train a magnitude vector")
    study.add_argument(
        "--loftq-iters",
        type=int,
        help="alternations of loftq_init / act_loftq_init (default: 5)",
    )
    study.add_argument(
        "--objective",
        choices=OBJECTIVE_NAMES,
        help="ce: labels; kd: distil the uncompressed layer (train labels unused); ce+kd: both "
        "(default: ce)",
    )
    study.add_argument("--kd-temperature", type=float, help="distillation temperature (default: 2)")
    study.add_argument("--kd-weight", type=float, help="weight of kd in ce+kd, 0..1 (default: 0.5)")

    many = parser.add_argument_group("many workers")
    many.add_argument(
        "--workers",
        type=int,
        help="worker processes on this machine sharing the sweep through --storage (one GPU "
        "each when there are several); default 1",
    )
    many.add_argument(
        "--storage",
        help="Optuna storage URL (postgresql+psycopg://..., mysql+pymysql://..., sqlite:///...); "
        "processes with the same URL and the same settings share one sweep (default: the run "
        "folder's optuna.sqlite3)",
    )
    many.add_argument(
        "--share",
        choices=["trials", "ranks"],
        help="how workers divide the sweep: trials (any worker runs any free trial; TPE's later "
        "suggestions then depend on the order trials finish) or ranks (each rank's trials and "
        "final models are one worker's, largest rank first: on a CPU with the same --threads, "
        "every study is the one a one-process run records); default trials",
    )
    many.add_argument("--study-prefix", help="prefix of the study names in the storage")
    many.add_argument(
        "--heartbeat",
        type=int,
        help="with several workers: seconds between a running trial's heartbeats; a trial "
        "silent for 3 of them is failed and run again (default: 10)",
    )
    many.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)

    compress_group = parser.add_argument_group("compression")
    compress_group.add_argument(
        "--preset",
        help="default (4x4 absmax, int1 row scale) or seed-compat (the original code's choices)",
    )
    compress_group.add_argument("--block", help="sparse block shape HxW, e.g. 4x4 or 1x16")
    compress_group.add_argument("--keep", help=f"sparse keep rule: {', '.join(KEEP_NAMES)}")
    compress_group.add_argument("--int1-scale", help=f"int1 scale: {', '.join(INT1_SCALE_NAMES)}")
    compress_group.add_argument(
        "--int-scale",
        help=f"int2-int8 row scale: {', '.join(INT_SCALE_NAMES)} (default: max)",
    )
    compress_group.add_argument(
        "--int-grid",
        help="int2-int8 codes: symmetric (2^N - 1 levels, the default), full (the signed range, "
        "2^N levels) or affine (2^N levels and an N-bit zero point per row)",
    )
    compress_group.add_argument(
        "--scale-dtype",
        help=f"int2-int8 row scales stored as {' or '.join(SCALE_DTYPE_NAMES)}, and counted so "
        "(default: fp32)",
    )
    compress_group.add_argument(
        "--quantizer",
        help="int1-int8 rounding: rtn (to nearest, the default), gptq (error feedback through "
        "the layer's input moment, from the train split), or, for int2-int8 only (not int1) "
        "with --reconstruct, adaround (each weight's rounding up or down learned with its "
        "block's adapters, from round to nearest) or gptq-adaround (learned from GPTQ's codes)",
    )
    compress_group.add_argument("--nm", help="N:M pattern of the nm method (default: 2:4)")
    compress_group.add_argument(
        "--adapter-dtype",
        choices=ADAPTER_DTYPE_NAMES,
        help="dtype of the adapter in the packed checkpoint and the ratios; training is fp32; "
        "int8 / int4: the trained factors rounded once to codes with fp32 row scales, and the "
        "rounded model is the one scored (default: fp32)",
    )
    compress_group.add_argument(
        "--include-bias",
        action="store_true",
        help="count the (uncompressed) bias on both sides of the ratios",
    )

    network = parser.add_argument_group("whole network")
    network.add_argument(
        "--layers",
        nargs="+",
        metavar="PATTERN",
        help="layers to compress: head (the classifier, default), all (every Linear and "
        "Conv2d, stem and depthwise convs included), or fnmatch patterns over module names, "
        "e.g. 'blocks.*.mlp.*'; a BatchNorm that reads a selected conv alone is folded into it",
    )
    network.add_argument(
        "--skip-depthwise",
        action="store_true",
        help="leave grouped (depthwise) convs out of --layers",
    )
    network.add_argument(
        "--calib-images",
        type=int,
        help="train images the activation-aware inits see, layer by layer (default: "
        f"{RunOptions.calib_images})",
    )
    network.add_argument(
        "--calib-augment",
        type=int,
        metavar="K",
        help="K views of each calibration image (the image, then random resized crops, each "
        "flipped at random; seeded), used wherever calibration images are (default: 1)",
    )
    network.add_argument(
        "--calibration",
        choices=("symmetric", "asymmetric"),
        help="symmetric (default): act_svd_init / act_loftq_init and --quantizer gptq fit each "
        "layer's own weight on the inputs the compressed layers before it produce; "
        "asymmetric: fit the uncompressed network's outputs on those inputs, correcting the "
        "error from upstream (as GPTAQ). Whole-network mode only: with --layers head the "
        "inputs are clean and both are the same, so asymmetric is refused there",
    )
    network.add_argument(
        "--asymmetric-strength",
        type=float,
        metavar="S",
        help="with --calibration asymmetric: the weight in [0, 1] of the clean network's outputs "
        "in each fit, against the layer's own outputs on the same inputs (1: the clean outputs "
        "alone; default: 1)",
    )
    network.add_argument(
        "--reconstruct",
        choices=("none", "block", "network"),
        help="after each rank's init, train the adapters without labels on the calibration "
        "images to reproduce the uncompressed network: block (each block's output, in forward "
        "order, from the reconstructed prefix's input; as BRECQ) or network (block, then every "
        "adapter together on the uncompressed logits, KL); the result is every trial's init "
        "and what init_only scores (default: none)",
    )
    for flag, kind, metavar, text in RECONSTRUCT_SETTINGS:
        default = getattr(RunOptions, flag.removeprefix("--").replace("-", "_"))
        network.add_argument(
            flag, type=kind, metavar=metavar, help=f"{text} (default: {default:g})"
        )
    network.add_argument(
        "--reconstruct-weighting",
        choices=("relative", "brecq"),
        help="how a block's loss weighs its output error against the learned rounding's "
        "regulariser: relative (mean squared error over the target's power, plus --rounding-weight "
        "times the regulariser's mean) or brecq (as BRECQ: the squared error summed over the "
        "output channels, plus --rounding-weight times the regulariser summed over every "
        "weight; default: relative)",
    )
    network.add_argument(
        "--rounding-relaxation",
        choices=("straight-through", "soft"),
        help="what learned rounding (--quantizer adaround, gptq-adaround) trains on: "
        "straight-through (the hard codes, the gradient through the soft ones) or soft "
        "(AdaRound's relaxation: the soft weight, driven to the grid by the regulariser, then "
        "hardened; default: straight-through)",
    )
    network.add_argument(
        "--bits-budget",
        type=float,
        nargs="+",
        metavar="B",
        help="also run one budgeted model per B: each selected layer takes its own method and "
        "rank from --methods x --ranks, the stored bits of the selected layers at most B per "
        "weight, the summed sensitivity of the layers (--budget-sensitivity, measured once for "
        "every B) smallest (a knapsack: exact, or greedy with its gap stated); its rows' quant is "
        "budget<B>, their lora_rank the largest rank it gives a layer, and layers.csv holds each "
        "layer's choice",
    )
    network.add_argument(
        "--budget-only",
        action="store_true",
        help="with --bits-budget, build and score the budgeted models alone: no model with one "
        "method and rank everywhere (each of those costs its own init and reconstruction)",
    )
    network.add_argument(
        "--layer-plan",
        type=Path,
        metavar="FILE",
        help="each layer's method and rank from FILE (JSON or YAML: module-name patterns to "
        "{method, rank}; every run writes its models' plans to plans/): one model, in place of "
        "--layers, --methods and --ranks (docs/layer-plans.md)",
    )
    network.add_argument(
        "--budget-sensitivity",
        choices=("output", "kl", "kl-reconstructed"),
        help="what --bits-budget minimises, summed over the layers, each measured with that "
        "layer alone compressed: output, its relative output error on the calibration images "
        "(every layer counts the same); kl, KL(original || model) of the network's logits on "
        "them (one pass per layer and option; weighs each layer by its effect on the output); "
        "kl-reconstructed, that KL after the option's block is reconstructed as --reconstruct "
        "says (needs --reconstruct; one block reconstruction per layer and option)",
    )
    network.add_argument(
        "--budget-sensitivity-steps",
        type=int,
        metavar="N",
        help="with --budget-sensitivity kl-reconstructed, the Adam steps of each option's block "
        "reconstruction while the options are priced (default: --reconstruct-steps): a cheaper "
        "proxy that prices each option by a shorter reconstruction than its model gets",
    )
    network.add_argument(
        "--cache-limit",
        type=float,
        metavar="GB",
        help="refuse a whole-network run whose image cache would exceed this many GB "
        f"(default: {RunOptions.cache_limit:g})",
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
    data.add_argument("--device", choices=["auto", "cpu", "cuda"])
    data.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: the cores this process may use; with --workers "
        "N, each worker's sweep gets those cores / N)",
    )
    data.add_argument(
        "--feature-batch-size",
        type=int,
        help="images per forward pass (default: 64)",
    )
    data.add_argument(
        "--decode-workers",
        type=int,
        help="image decoding processes (default: 0 on CPU, decoding in threads; up to 8 on GPU)",
    )
    data.add_argument(
        "--decode",
        type=decode_mode,
        metavar="{cpu,gpu}",
        help="where the feature pass decodes and resizes JPEGs: cpu (PIL, default) or gpu "
        "(nvJPEG and torchvision's resize on the CUDA device; its pixels differ slightly)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--results-dir",
        type=Path,
        help=f"where runs, the feature cache and the summary go (default: "
        f"{RunOptions.results_dir}, in the working directory)",
    )
    output.add_argument(
        "--out",
        type=Path,
        help="this run's folder (default: <results-dir>/<model>/<data>/<init>)",
    )
    output.add_argument(
        "--cache-dir", type=Path, help="feature cache (default: <results-dir>/cache)"
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of a run of another configuration in the run's folder",
    )
    output.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="start from the options of a run's run.json (or a JSON object of option names to "
        "values); options given on the command line override them",
    )
    # every default from RunOptions, the one place they are written (no add_argument sets one)
    parser.set_defaults(**RunOptions.defaults())
    return parser


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def storage_failure(error: Exception) -> str | None:
    """One line for a failure of the disk or the Optuna database, or None for anything else."""
    import sqlalchemy

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device ({error.filename or 'while writing'}); free some "
            "space and rerun the same command: finished trials and ranks are kept"
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {error.filename}: {error.strerror}"
    if isinstance(error, sqlalchemy.exc.SQLAlchemyError):
        detail = str(getattr(error, "orig", None) or error).splitlines()[0]
        if "full" in detail:
            return f"no space left for the Optuna database ({detail}); free some space and rerun"
        return (
            f"the run's Optuna database (optuna.sqlite3) cannot be used: {detail}; move it "
            "aside or rerun with --overwrite"
        )
    return None
