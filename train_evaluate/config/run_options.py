"""Every option of a run, with its default, defined once.

The parser (``cli.build_parser``) takes its defaults from ``RunOptions`` and sets none of its
own; ``options.parse_args`` answers a ``RunOptions``; run.json's ``options`` is its dump, which
``--config`` reads back (timm's train.py keeps its args.yaml the same way). Imports nothing
heavy, like the parser.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Relative to the working directory, as timm's train.py, Optuna's CLI and pytest resolve theirs:
# run from the repository root these are the README's folders, and an installed command never
# writes beside its own package.
DEFAULT_DATA = Path("..") / "archive" / "imagenet_validation"
DEFAULT_RESULTS = Path("results")
DEFAULT_MODEL = "resnet18.tv_in1k"  # --model when a real ImageNet folder is used
DEFAULT_RANKS = (2, 4, 8, 16, 32, 64, 128)  # --ranks when none are given (those that fit)
# --reconstruct's defaults: lora.reconstruction.ReconstructionConfig's (kept free of torch here;
# a test holds the two equal)
RECONSTRUCT_DEFAULTS = {
    "block_steps": 100, "network_steps": 50, "lr": 1e-3, "batch_size": 32, "held_out": 0.125,
    "drop": 0.0, "weighting": "relative", "relaxation": "straight-through",
    "rounding_weight": 0.01, "rounding_lr": 1e-2,
}  # fmt: skip


@dataclass(frozen=True)
class RunOptions:
    """The driver's options, in the order ``--help`` lists them (see there for each one's
    meaning). ``None``: decided by the run (``model``: the demo's or DEFAULT_MODEL; ``ranks``:
    DEFAULT_RANKS that fit; a compression option: the method's own default)."""

    # the study
    init: str = "paper_init"
    methods: tuple[str, ...] = ("sparse", "int1")
    ranks: tuple[int, ...] | None = None
    trials: int = 10
    search: str = "rank"
    epochs: int = 10
    seed: int = 0
    split: tuple[float, float, float] = (0.64, 0.16, 0.20)
    lr_range: tuple[float, float] = (1e-4, 1e-2)
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    alphas: tuple[int, ...] = (8, 16, 24, 32, 40, 48)
    final_seeds: int = 1
    no_pruning: bool = False
    dora: bool = False
    loftq_iters: int = 5
    objective: str = "ce"
    kd_temperature: float = 2.0
    kd_weight: float = 0.5
    # many workers
    workers: int = 1
    storage: str | None = None
    share: str = "trials"
    study_prefix: str = ""
    heartbeat: int = 10
    worker_of: int | None = None
    # compression
    preset: str = "default"
    block: str | None = None
    keep: str | None = None
    int1_scale: str | None = None
    int_scale: str | None = None
    int_grid: str | None = None
    scale_dtype: str | None = None
    quantizer: str | None = None
    nm: str | None = None
    adapter_dtype: str = "fp32"
    include_bias: bool = False
    # the whole network
    layers: tuple[str, ...] = ("head",)
    skip_depthwise: bool = False
    calib_images: int = 512
    calib_augment: int = 1
    calibration: str = "symmetric"
    fit_ridge: float | None = None  # None: lora.inits.FitConfig's
    asymmetric_strength: float | None = None
    reconstruct: str = "none"
    reconstruct_steps: int = RECONSTRUCT_DEFAULTS["block_steps"]
    reconstruct_network_steps: int = RECONSTRUCT_DEFAULTS["network_steps"]
    reconstruct_lr: float = RECONSTRUCT_DEFAULTS["lr"]
    reconstruct_batch: int = RECONSTRUCT_DEFAULTS["batch_size"]
    reconstruct_held_out: float = RECONSTRUCT_DEFAULTS["held_out"]
    reconstruct_drop: float = RECONSTRUCT_DEFAULTS["drop"]
    reconstruct_weighting: str = RECONSTRUCT_DEFAULTS["weighting"]
    rounding_relaxation: str = RECONSTRUCT_DEFAULTS["relaxation"]
    rounding_weight: float = RECONSTRUCT_DEFAULTS["rounding_weight"]
    rounding_lr: float = RECONSTRUCT_DEFAULTS["rounding_lr"]
    bits_budget: tuple[float, ...] | None = None
    budget_only: bool = False
    layer_plan: Path | None = None
    budget_sensitivity: str = "output"
    budget_sensitivity_steps: int | None = None
    cache_limit: float = 16.0
    # data, model and machine
    data_dir: Path | None = None
    demo: bool = False
    model: str | None = None
    weights: Path | None = None
    device: str = "auto"
    threads: int | None = None
    feature_batch_size: int = 64
    decode_workers: int | None = None
    decode: str = "cpu"
    # outputs
    results_dir: Path = DEFAULT_RESULTS
    out: Path | None = None
    cache_dir: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        # one type per option, however it came (the parser gives lists, a default or --config
        # may give tuples or lists): equal options compare equal
        for name in self.names():
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default, as the parser is given them."""
        return {name: getattr(cls(), name) for name in cls.names()}

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults (sequences are tuples on both sides)."""
        defaults = self.defaults()
        return {
            name: value for name in self.names() if (value := getattr(self, name)) != defaults[name]
        }
