"""Whole-network mode: compress any chosen set of a timm model's Linear and Conv2d layers.

The FC-only study is the case of one selected layer, the classifier, and keeps its own path
(pre-logits features cached, base logits computed once). Any other selection runs here:

- ``select_layers``: ``--layers`` patterns (fnmatch over ``named_modules()`` names, plus ``head``
  and ``all``) resolved to module names, refused in one line when a pattern selects nothing or
  something no compressor handles (a depthwise conv, a LayerNorm);
- the decoded, resized and cropped images are cached as uint8 at the model's input size, so
  that no image is decoded twice (``ImageModel`` scales and normalises them exactly as timm's
  eval transform does). When a block boundary precedes every selected layer, its output (the
  state) is cached as well, once, and every step runs the network from there on
  (``StateModel``; ``train_evaluate.inputs.cut`` finds and verifies the boundary);
- ``NetworkMethod``: one compressor applied to every selected layer; per rank, the layers are
  compressed and their adapters initialised in forward order, an activation-aware init seeing
  the inputs that the already compressed prefix produces (``lora.calibration``);
- ``AdaptedNetwork``: the compressed network with its adapters, trained together by the shared
  training loop (the frozen part stays in eval mode: BatchNorm statistics never move);
- ``NetworkAccounting``: every bit of the selected layers (values, indices, scales, adapters at
  their dtype, the biases they have) against their dense fp32 size, per layer and in total
  (``bits_per_weight``), and of the whole model (``model_bits_per_weight``).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from compression import StorageCost, compress, compressible, replace_submodule, weight_matrix
from compression.accounting import account_layer, dense_cost, model_bits_per_weight
from lora import LoraConfig, make_adapter
from lora.attach import classifier_name
from lora.calibration import calibrate_sequentially, compress_sequentially
from lora.capture import first_outputs, forward_order
from lora.reconstruction import (
    NO_RECONSTRUCTION,
    ReconstructionConfig,
    UnitRecord,
    learned_bases,
    reconstruct,
    reconstruction_units,
)

log = logging.getLogger(__name__)

HEAD, ALL = "head", "all"
IMAGES_FORMAT = "lora-compression-images/1"
EVAL_CHUNK = 256  # images per forward pass when a whole network is evaluated
CALIBRATION_BATCH = 32


class SelectionError(ValueError):
    """A ``--layers`` selection that cannot be run; the message says what to change."""


def classifier_module_name(model: nn.Module) -> str:
    try:
        return classifier_name(model)
    except ValueError as error:
        raise SelectionError(str(error)) from error


def select_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The module names ``patterns`` select, in the model's order.

    ``head``: the classifier; ``all``: every Linear and every Conv2d with groups == 1 (a
    depthwise conv is left out: no compressor here handles it); anything else: an fnmatch
    pattern over ``named_modules()`` names, which must select at least one Linear or Conv2d and
    no module that cannot be compressed.
    """
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if n and isinstance(m, nn.Linear | nn.Conv2d)}
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == HEAD:
            chosen.add(classifier_module_name(model))
            continue
        if pattern == ALL:
            chosen.update(n for n, m in layers.items() if compressible(m) is None)
            continue
        matched = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            examples = ", ".join(list(layers)[:3])
            raise SelectionError(
                f"--layers {pattern!r} matches no module of the model; names look like "
                f"{examples} (or use 'head' or 'all')"
            )
        selected = [n for n in matched if n in layers]
        if not selected:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in matched[:3])
            raise SelectionError(
                f"--layers {pattern!r} matches {kinds}, not a Linear or Conv2d layer; "
                "select Linear or Conv2d layers"
            )
        for name in selected:
            reason = compressible(layers[name])
            if reason is not None:
                raise SelectionError(
                    f"--layers {pattern!r} selects {name}: {reason}; narrow the pattern"
                )
        chosen.update(selected)
    return [n for n in layers if n in chosen]


def left_out(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """The Linear and Conv2d layers a selection does not compress, grouped by why they cannot
    be (depthwise convs, layers with a forward of their own), for the run's announcement."""
    chosen = set(names)
    reasons: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name in chosen or not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        reason = compressible(module)
        if reason is not None:
            reasons.setdefault(reason.split(";")[0], []).append(name)
    return reasons


def is_head_only(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether the selection is the classifier alone: today's FC path."""
    return list(names) == [classifier_module_name(model)]


# ----------------------------------------------------------------------------- the image cache


def uint8_transform(transform: T.Compose) -> T.Compose:
    """timm's eval transform up to the crop, ending in uint8 pixels instead of normalised floats.

    The float transform is ``... crop, ToTensor (x / 255), Normalize``; ``ImageModel`` applies
    the last two to the stored pixels with the same operations, so nothing is lost by storing
    uint8 (ToTensor itself divides the uint8 pixels by 255).
    """
    steps = list(transform.transforms)
    kinds = [type(step).__name__ for step in steps[-2:]]
    if kinds[-1] != "Normalize" or "ToTensor" not in kinds[0]:
        raise SelectionError(f"unexpected preprocessing {kinds}: cannot cache uint8 images")
    return T.Compose([*steps[:-2], T.PILToTensor()])


def normalisation(transform: T.Compose) -> tuple[tuple[float, ...], tuple[float, ...]]:
    last = transform.transforms[-1]
    return tuple(float(v) for v in last.mean), tuple(float(v) for v in last.std)


def precision(inputs: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (mixed precision: parameters, gradients and optimizer state stay
    fp32); on CPU everything is fp32."""
    if inputs.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageModel(nn.Module):
    """A classifier that takes cached uint8 images: x / 255, normalised, then the model."""

    eval_chunk = EVAL_CHUNK

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        # the same two operations, in the same order, as ToTensor and Normalize
        return images.float().div(255).sub(self.mean).div(self.std)

    def forward(self, images: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        with precision(images):
            return self.model(self.preprocess(images)).float()

    def wrap(self, model: nn.Module) -> ImageModel:
        """``model`` (this one's network with other layers) taking the same inputs as this."""
        return ImageModel(model, self.mean.flatten().tolist(), self.std.flatten().tolist())


class StateModel(ImageModel):
    """The network from a cache cut on (``train_evaluate.inputs.cut``): it takes the cached state,
    the
    float32 output of a block boundary (``state_shape`` per image), which needs no scaling; the
    modules before the boundary are skipped."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        state_shape: Sequence[int],
    ) -> None:
        super().__init__(model, mean, std)
        self.state_shape = tuple(state_shape)

    def preprocess(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def wrap(self, model: nn.Module) -> StateModel:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return StateModel(model, mean, std, self.state_shape)


def image_bytes(count: int, input_size: Sequence[int]) -> int:
    return count * math.prod(input_size)


# --------------------------------------------------------------------------- layers and costs


@dataclass(frozen=True)
class LayerInfo:
    """One selected layer: its name, kind, weight shape, matrix shape (out x in*kh*kw), the
    spatial positions (tokens, pixels) of its output per image, which multiply its compute, and
    whether it has a bias (a conv before a BatchNorm has none: nothing stored, nothing counted)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    positions: int
    bias: bool = True

    @property
    def matrix(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def rank(self, requested: int) -> int:
        """The requested rank, clamped to what the layer can hold: min(out, in*kh*kw)."""
        return min(requested, min(self.matrix))

    @classmethod
    def of(cls, name: str, module: nn.Module, positions: int = 1) -> LayerInfo:
        """The layer ``module`` (a Linear or Conv2d, on any device, ``meta`` included)."""
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        return cls(name, kind, tuple(module.weight.shape), positions, module.bias is not None)


def describe_layers(
    model: nn.Module, names: Sequence[str], example: torch.Tensor
) -> list[LayerInfo]:
    """The selected layers in forward order, with their output positions on ``example``."""
    order = forward_order(model, example, list(names))
    modules = {name: model.get_submodule(name) for name in order}
    outputs = first_outputs(model, modules, example[:1])
    # one image's output holds positions x out values, whatever its layout (NCHW convs,
    # tokens, NHWC or window-partitioned Linears)
    positions = {
        name: max(1, outputs[name].numel() // modules[name].weight.shape[0]) for name in outputs
    }
    return [LayerInfo.of(name, model.get_submodule(name), positions.get(name, 1)) for name in order]


@dataclass(frozen=True)
class NetworkAccounting:
    """How a whole-network run prices its rows: every selected layer with its own clamped rank,
    its compressor's exact cost and its adapter at the stored dtype; the rest of the model at
    its own dtype for ``ratio_model`` and ``model_bits_per_weight``.

    The bias, as in the FC study: ``bits`` and ``bits_per_weight`` hold every bit the packed
    file stores, so the biases the selected layers have, always; ``include_bias`` decides only
    the ratios, counting those biases on both sides or on neither. A layer without a bias adds
    nothing anywhere. ``model_weights``: the Linear and Conv2d weights of the whole model."""

    layers: tuple[LayerInfo, ...]
    costs: tuple[StorageCost, ...]
    adapter_dtype_bits: int
    dora: bool
    include_bias: bool
    backbone_bits: int  # every other parameter and buffer of the model
    selection: str
    adapter_code_bits: int = 0  # int8 / int4 adapters: codes and row scales
    model_weights: int | None = None
    # --bits-budget: each layer's own requested rank, whatever rank a row names (0: none)
    ranks: tuple[int, ...] | None = None

    def per_layer(self, rank: int, costs: Sequence[StorageCost] | None = None):
        costs = self.costs if costs is None else costs
        ranks = self.ranks or (rank,) * len(self.layers)
        for info, cost, own in zip(self.layers, costs, ranks, strict=True):
            r = info.rank(own) if rank and own else 0
            yield (
                info,
                r,
                account_layer(
                    *info.matrix,
                    cost,
                    r,
                    adapter_dtype_bits=self.adapter_dtype_bits,
                    extra_adapter_params=info.shape[0] if self.dora and r else 0,
                    include_bias=self.include_bias,
                    adapter_code_bits=self.adapter_code_bits,
                    has_bias=info.bias,
                ),
            )

    def weights(self) -> int:
        return sum(math.prod(info.matrix) for info in self.layers)

    def original_cost(self) -> StorageCost:
        """The selected layers uncompressed (fp32), for the ``original`` row."""
        costs = [dense_cost(*info.matrix) for info in self.layers]
        return StorageCost(*(sum(getattr(c, f) for c in costs) for f in StorageCost.__match_args__))

    def columns(self, cost: StorageCost, rank: int) -> dict[str, Any]:
        """The ratio columns of a row: ``cost`` is ``original_cost()`` for the ``original`` row;
        every other row prices each layer with its own compressor cost (``costs``)."""
        original = cost == self.original_cost()
        costs = [dense_cost(*info.matrix) for info in self.layers] if original else None
        rows = list(self.per_layer(rank, costs))
        dense_bits = sum(a.dense_bits for _, _, a in rows)
        bits = sum(a.compressed_bits for _, _, a in rows)  # the ratios' side: include_bias
        stored = sum(a.stored_bits for _, _, a in rows)  # what the file holds: biases too
        seed_bits = sum(a.seed_bits for _, _, a in rows)
        dense_macs = sum(a.dense_macs * info.positions for info, _, a in rows)
        macs = sum(a.compressed_macs * info.positions for info, _, a in rows)
        return {
            "ratio": dense_bits / bits,
            "ratio_seed": dense_bits / seed_bits,
            "ratio_model": (self.backbone_bits + dense_bits) / (self.backbone_bits + bits),
            "compute_ratio": dense_macs / macs,
            "bits": stored,
            "bias_counted": self.include_bias,
            "layers": self.selection,
            "bits_per_weight": stored / self.weights(),
            "model_bits_per_weight": model_bits_per_weight(
                self.backbone_bits, stored, self.model_weights
            ),
        }

    @property
    def dense_bytes(self) -> int:
        """The selected layers' weights and the biases they have, at fp32: what ``ratio_file``
        divides (a bias-free conv has no bias to count)."""
        return 4 * sum(
            math.prod(info.matrix) + (info.shape[0] if info.bias else 0) for info in self.layers
        )

    def layer_rows(self, method: str, rank: int) -> list[dict[str, Any]]:
        """``layers.csv`` rows of one (method, rank): each layer's shape, clamped rank, bits and
        ratio."""
        return [
            {
                "quant": method,
                "lora_rank": rank,
                "layer": info.name,
                "kind": info.kind,
                "shape": "x".join(map(str, info.shape)),
                "rank": r,
                "bits": a.stored_bits,
                "bits_per_weight": a.stored_bits / math.prod(info.matrix),
                "ratio": a.ratio,
            }
            for info, r, a in self.per_layer(rank)
        ]


# ------------------------------------------------------------------ compressed, adapted networks


class AdaptedNetwork(nn.Module):
    """The compressed network with an adapter in each selected layer.

    It takes the cached uint8 images and answers logits. Only the adapters train: ``train()``
    marks this module as training but leaves the frozen network in eval mode, so BatchNorm
    keeps its running statistics and dropout stays off, as in the FC study.
    """

    eval_chunk = EVAL_CHUNK

    def __init__(self, network: ImageModel, names: Sequence[str]) -> None:
        super().__init__()
        self.network = network
        self.names = tuple(names)

    def adapters(self) -> dict[str, nn.Module]:
        return {name: self.network.model.get_submodule(name) for name in self.names}

    @property
    def use_dora(self) -> bool:
        return any(a.use_dora for a in self.adapters().values())

    def forward(self, images: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(images)

    def train(self, mode: bool = True) -> AdaptedNetwork:
        self.training = mode
        self.network.eval()
        return self

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}:{key}": value
            for name, adapter in self.adapters().items()
            for key, value in adapter.adapter_state().items()
        }

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, adapter in self.adapters().items():
            prefix = f"{name}:"
            adapter.load_adapter_state(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )

    @property
    def base_layer(self) -> ImageModel:
        """The stored compressed network without its adapters (what ``base_only`` scores)."""
        base = copy.deepcopy(self.network)
        for name in self.names:
            replace_submodule(base.model, name, base.model.get_submodule(name).base_layer)
        return base.eval()


@dataclass(eq=False)
class NetworkMethod:
    """One compressor on every selected layer; shared by all ranks and trials of a run.

    ``model``: the uncompressed classifier on uint8 images (frozen, eval); ``calibration``: the
    train-split images the activation-aware inits see. Per rank, the layers are compressed and
    initialised in forward order once (``contexts``); every trial and final model rebuilds its
    adapters from those contexts (no further forward passes), with its own alpha and seed.
    """

    name: str
    config: Any
    model: ImageModel
    layers: tuple[LayerInfo, ...]
    calibration: torch.Tensor
    costs: tuple[StorageCost, ...]
    positions: int = 64
    asymmetric: bool = False  # --calibration asymmetric: fit the clean network's outputs
    reconstruction: ReconstructionConfig = NO_RECONSTRUCTION
    units: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the blocks reconstruction trains
    # --bits-budget: each layer's own compressor and requested rank (``config`` is then a
    # budget.PerLayerCompression, and the rank a row names is the largest of them)
    layer_configs: dict[str, Any] | None = None
    layer_ranks: dict[str, int] | None = None
    _contexts: dict[tuple, dict[str, Any]] = field(default_factory=dict, repr=False)
    # per rank: each layer's reconstructed adapter tensors, the scaling they were found at and,
    # with learned rounding, its stored base
    _learned: dict[tuple, dict[str, tuple]] = field(default_factory=dict, repr=False)
    records: dict[int, list[UnitRecord]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        name: str,
        config: Any,
        model: ImageModel,
        layers: Sequence[LayerInfo],
        calibration: torch.Tensor,
        asymmetric: bool = False,
        reconstruction: ReconstructionConfig = NO_RECONSTRUCTION,
        units: Sequence[tuple[str, tuple[str, ...]]] = (),
        layer_configs: dict[str, Any] | None = None,
        layer_ranks: dict[str, int] | None = None,
    ) -> NetworkMethod:
        configs = layer_configs or {}
        costs = tuple(
            compress(
                weight_matrix(model.model.get_submodule(info.name)), configs.get(info.name, config)
            ).cost
            for info in layers
        )
        return cls(
            name, config, model, tuple(layers), calibration, costs, asymmetric=asymmetric,
            reconstruction=reconstruction, units=tuple(units), layer_configs=layer_configs,
            layer_ranks=layer_ranks,
        )  # fmt: skip

    @property
    def cost(self) -> StorageCost:
        """The compressor's storage over every selected layer (no adapters)."""
        return StorageCost(
            sum(c.value_bits for c in self.costs),
            sum(c.index_bits for c in self.costs),
            sum(c.scale_bits for c in self.costs),
            sum(c.macs for c in self.costs),
        )

    def names(self) -> list[str]:
        return [info.name for info in self.layers]

    def targets(self) -> dict[str, Any]:
        """Each selected layer's compressor config."""
        configs = self.layer_configs or {}
        return {info.name: configs.get(info.name, self.config) for info in self.layers}

    def compressed_model(self) -> ImageModel:
        """Every selected layer compressed, no adapters: the ``quantized`` row. A calibrated
        compressor compresses in forward order on the calibration images' inputs."""
        from compression import CompressedConv2d, CompressedLinear, uses_inputs

        network = copy.deepcopy(self.model)
        targets = self.targets()
        if any(uses_inputs(config) for config in targets.values()):
            compress_sequentially(
                network.model,
                targets,
                lambda: self._calibration_batches(),
                positions=self.positions,
                asymmetric=self.asymmetric,
            )
            return network.requires_grad_(False).eval()
        for info in self.layers:
            dense = network.model.get_submodule(info.name)
            kind = CompressedConv2d if info.kind == "conv2d" else CompressedLinear
            replace_submodule(network.model, info.name, kind.from_dense(dense, targets[info.name]))
        return network.requires_grad_(False).eval()

    def _calibration_batches(self) -> Iterator[torch.Tensor]:
        device = next(self.model.parameters()).device
        for chunk in self.calibration.split(CALIBRATION_BATCH):
            yield self.model.preprocess(chunk.to(device))

    def lora_config(self, info: LayerInfo, rank: int, alpha: float, sweep: Any) -> LoraConfig:
        if self.layer_ranks is not None:
            rank = self.layer_ranks[info.name]
        return LoraConfig(
            r=info.rank(rank),
            lora_alpha=alpha,
            init=sweep.init,
            use_dora=sweep.use_dora,
            loftq_iters=sweep.loftq_iters,
        )

    def contexts(self, rank: int, sweep: Any) -> dict[str, Any]:
        """Each layer's InitContext for ``rank``, computed sequentially in forward order once."""
        key = (rank, sweep.init, sweep.loftq_iters)
        if key not in self._contexts:
            started = time.perf_counter()
            scratch = copy.deepcopy(self.model.model).eval()
            by_name = {info.name: info for info in self.layers}
            adapted = calibrate_sequentially(
                scratch,
                self.targets(),
                lambda name, _module: self.lora_config(by_name[name], rank, 8.0, sweep),
                lambda: self._calibration_batches(),
                generator=torch.Generator().manual_seed(0),
                positions=self.positions,
                asymmetric=self.asymmetric,
            )
            # ranks run one after another: only the current one's contexts are kept (their
            # float64 moments can take a gigabyte per rank on a large model)
            self._contexts = {key: {name: context for name, (_, context) in adapted.items()}}
            log.info(
                "%s r=%d: %d layers compressed and initialised (%s) in %.1f s",
                self.name,
                rank,
                len(self.layers),
                sweep.init,
                time.perf_counter() - started,
            )
            self._learned = {}
            if self.reconstruction.enabled:
                self._learned = {key: self._reconstruct(rank, sweep, self._contexts[key])}
        return self._contexts[key]

    def _reconstruct(self, rank: int, sweep: Any, contexts: dict[str, Any]) -> dict[str, tuple]:
        """The adapters of ``rank`` after ``--reconstruct`` (from the init at alpha 8 and seed
        0): each layer's tensors, the scaling they were trained at and, where the rounding was
        learned, the stored base with the learned codes (else None)."""
        from tqdm import tqdm

        started = time.perf_counter()
        network = self._build(rank, 8.0, sweep, 0, contexts)
        inputs = torch.cat(list(self._calibration_batches()))
        stages = len(self.units) + (self.reconstruction.mode == "network")
        with tqdm(total=stages, desc=f"reconstruct r={rank}", disable=None) as bar:
            records = reconstruct(
                network.network.model, self.model.model, self.units, inputs,
                self.reconstruction, lambda _unit: bar.update(),
            )  # fmt: skip
        self.records[rank] = records
        worse = [r.unit for r in records if r.kept == "start"]
        log.info(
            "%s r=%d: %d blocks reconstructed (%s) in %.1f s; relative error %.4g -> %.4g "
            "(first block), %.4g -> %.4g (last)%s",
            self.name, rank, len(records), self.reconstruction.mode,
            time.perf_counter() - started, records[0].error_start, records[0].error_end,
            records[-1].error_start, records[-1].error_end,
            f"; kept the start of {', '.join(worse)}" if worse else "",
        )  # fmt: skip
        bases = learned_bases(network.network.model, self.names())
        return {
            name: (adapter.adapter_state(), adapter.scaling, bases.get(name))
            for name, adapter in network.adapters().items()
        }

    def _build(
        self, rank: int, alpha: float, sweep: Any, seed: int, contexts: dict[str, Any]
    ) -> AdaptedNetwork:
        network = copy.deepcopy(self.model).requires_grad_(False).eval()
        device = next(network.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        for info in self.layers:
            dense = network.model.get_submodule(info.name)
            config = self.lora_config(info, rank, alpha, sweep)
            adapter = make_adapter(dense, config, contexts[info.name], generator)
            replace_submodule(network.model, info.name, adapter)
        return AdaptedNetwork(network, self.names())

    def layer(self, rank: int, alpha: float, sweep: Any, seed: int) -> AdaptedNetwork:
        """A fresh compressed network with adapters of ``rank`` (clamped per layer), ``alpha``
        and ``seed`` (the random draws of paper_init, in forward order). After
        ``--reconstruct``, every adapter starts from its reconstructed tensors whatever the
        seed, B rescaled so that scaling * B @ A is the reconstructed delta at any alpha."""
        contexts = self.contexts(rank, sweep)
        network = self._build(rank, alpha, sweep, seed, contexts)
        learned = self._learned.get((rank, sweep.init, sweep.loftq_iters))
        if learned:
            for name, adapter in network.adapters().items():
                state, scaling, base = learned[name]
                state = dict(state, lora_B=state["lora_B"] * (scaling / adapter.scaling))
                adapter.load_adapter_state(state)
                if base is not None:  # --quantizer adaround: the learned codes
                    adapter.base_layer.set_compressed(base)
        return network


# ----------------------------------------------------------------------------- caching images


def images_key(source: Any, transform: T.Compose) -> str:
    """The image cache's key: the data and the uint8 transform (no model, no device: the
    pixels do not depend on them)."""
    from train_evaluate.inputs.features import feature_key

    return feature_key(format=IMAGES_FORMAT, data=source.fingerprint, transform=repr(transform))


def decode_images(source: Any, transform: T.Compose, batch_size: int, workers: int):
    """Every readable image of ``source`` as uint8 (N x C x H x W), with a progress bar."""
    from data.loader import ImageDataset, image_batches
    from train_evaluate.inputs.features import collect

    batches = image_batches(ImageDataset(source, transform), batch_size, workers, False)
    return collect(source, batches, lambda images: images, "images")


def cached_images(
    source: Any,
    transform: T.Compose,
    cache_dir,
    num_classes: int,
    batch_size: int = 64,
    workers: int = 0,
):
    """The decoded images of ``source`` from the cache, or decoded now and cached; returns the
    CachedFeatures (``features`` holds the uint8 images), the key and whether it was reused."""
    from train_evaluate.inputs.features import cached_features

    key = images_key(source, transform)

    def compute():
        started = time.perf_counter()
        cached = decode_images(source, transform, batch_size, workers)
        log.info(
            "images: decoded %d images in %.1f s", len(cached.ids), time.perf_counter() - started
        )
        return cached

    cached, reused = cached_features(cache_dir, key, compute, num_classes, "images")
    if reused:
        log.info("images: reusing the image cache (%d images) in %s", len(cached.ids), cache_dir)
    return cached, key, reused


def example_inputs(model: ImageModel, input_size: Sequence[int], count: int) -> torch.Tensor:
    """``count`` random inputs of what ``model`` takes: uint8 images, or float32 states."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(model, StateModel):
        return torch.randn((count, *model.state_shape), generator=generator)
    return torch.randint(0, 256, (count, *input_size), dtype=torch.uint8, generator=generator)


def cached_states(
    images: Any,
    model: ImageModel,
    cut: Any,
    cache_dir,
    key: str,
    num_classes: int,
    batch_size: int = 64,
):
    """The state at ``cut`` of every cached image (``images``: the image cache's
    CachedFeatures), from the cache under ``key`` or computed now by ``model``'s prefix alone
    (uncompressed, on its device) and cached; returns the CachedFeatures and whether they were
    reused. Same images, labels and ids as ``images``."""
    from tqdm import tqdm

    from train_evaluate.inputs.cut import state_of
    from train_evaluate.inputs.features import CachedFeatures, cached_features
    from train_evaluate.runtime import interrupt

    device = next(model.parameters()).device

    def compute():
        started = time.perf_counter()
        chunks = []
        with tqdm(total=len(images.ids), desc="states", unit="img", disable=None) as bar:
            for chunk in images.features.split(batch_size):
                interrupt.check()
                batch = model.preprocess(chunk.to(device))
                with torch.no_grad(), precision(batch):
                    chunks.append(state_of(model.model, cut.module, batch).cpu())
                bar.update(len(chunk))
        log.info(
            "states: %d images through the prefix up to %s in %.1f s",
            len(images.ids),
            cut.module,
            time.perf_counter() - started,
        )
        return CachedFeatures(torch.cat(chunks), images.labels, images.ids, images.skipped)

    cached, reused = cached_features(cache_dir, key, compute, num_classes, "states")
    if reused:
        log.info("states: reusing the cache of %s's output in %s", cut.module, cache_dir)
    return cached, reused


def epoch_seconds(model: ImageModel, example: torch.Tensor, images: int) -> float:
    """A rough cost of one training epoch over ``images``: one timed forward and backward pass
    of ``example`` (a small batch of the model's inputs) from the cache on, scaled. Printed
    before any work."""
    device = next(model.parameters()).device
    probe = copy.deepcopy(model).eval()
    inputs = probe.preprocess(example.to(device)).float().requires_grad_(True)
    started = time.perf_counter()
    probe.model(inputs).sum().backward()
    return (time.perf_counter() - started) / len(example) * images


# ------------------------------------------------------------------------------ a run's setup


def calibration_rows(train_rows: int, count: int, seed: int) -> torch.Tensor:
    """Which train rows the activation-aware inits see: ``count`` of them at random (seeded),
    in their split order."""
    from train_evaluate.training.training import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, "calibration"))
    return torch.randperm(train_rows, generator=generator)[:count].sort().values


@dataclass
class NetworkSetup:
    """What every method of a whole-network run shares: the model on images, the selected
    layers in forward order, the calibration images and how rows are priced."""

    model: ImageModel
    layers: tuple[LayerInfo, ...]
    calibration: torch.Tensor
    template: NetworkAccounting
    asymmetric: bool = False
    reconstruction: ReconstructionConfig = NO_RECONSTRUCTION
    units: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def create(
        cls, plan: Any, model: ImageModel, train: Any, adapter_bits: int, adapter_code_bits: int = 0
    ) -> NetworkSetup:
        from train_evaluate.inputs.backbone import layer_weights, tensor_bits
        from train_evaluate.inputs.cut import boundaries

        net = plan.network
        rows = calibration_rows(len(train), net.calib_images, plan.sweep.seed)
        calibration = train.features[rows.to(train.features.device)]
        example = model.preprocess(calibration[:1])
        layers = tuple(describe_layers(model.model, net.layers, example))
        unused = [n for n in net.layers if n not in {info.name for info in layers}]
        if unused:
            log.warning(
                "warning: %d selected layers are never called by the model's forward pass and "
                "stay uncompressed (not counted): %s",
                len(unused),
                ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else ""),
            )
        selected_bits = 0
        for info in layers:
            module = model.model.get_submodule(info.name)
            selected_bits += sum(
                t.numel() * t.element_size() * 8 for t in module.state_dict().values()
            )
        template = NetworkAccounting(
            layers,
            (),
            adapter_bits,
            plan.sweep.use_dora,
            plan.include_bias,
            tensor_bits(model) - selected_bits,
            f"{net.selection} ({len(layers)} layers)",
            adapter_code_bits,
            layer_weights(model),
        )
        asymmetric = getattr(net, "calibration", "symmetric") == "asymmetric"
        reconstruction = getattr(net, "reconstruction", None) or NO_RECONSTRUCTION
        units = ()
        if reconstruction.enabled:
            units = tuple(
                reconstruction_units([info.name for info in layers], boundaries(model.model))
            )
        return cls(model, layers, calibration, template, asymmetric, reconstruction, units)

    def method(self, name: str, config: Any) -> NetworkMethod:
        return NetworkMethod.create(
            name, config, self.model, self.layers, self.calibration, self.asymmetric,
            self.reconstruction, self.units,
        )  # fmt: skip

    def budget_method(self, name: str, budget: Any, compressions: dict[str, Any]) -> NetworkMethod:
        """The method of a solved ``--bits-budget`` (``budget.Budget``): each layer with its own
        compressor and rank."""
        chosen = budget.chosen
        return NetworkMethod.create(
            name, budget.compression(compressions), self.model, self.layers, self.calibration,
            self.asymmetric, self.reconstruction, self.units,
            layer_configs={c.layer: compressions[c.method] for c in chosen},
            layer_ranks={c.layer: c.rank for c in chosen},
        )  # fmt: skip

    def accounting(self, method: NetworkMethod) -> NetworkAccounting:
        ranks = None
        if method.layer_ranks is not None:
            ranks = tuple(method.layer_ranks[info.name] for info in method.layers)
        return replace(self.template, costs=method.costs, ranks=ranks)


LAYER_COLUMNS = (
    "quant", "lora_rank", "layer", "kind", "shape", "rank", "bits", "bits_per_weight", "ratio",
)  # fmt: skip


RECONSTRUCTION_COLUMNS = ("block", "block_error_start", "block_error_end", "block_codes_changed")


def with_reconstruction(
    rows: Sequence[dict[str, Any]], stages: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """``rows`` (one rank's layers.csv rows) with the block each layer was reconstructed in and
    that block's relative error before and after and the stored codes learned rounding changed
    in it. ``stages``: the rank record's ``reconstruction`` (``UnitRecord`` fields), the same
    whether the rank ran here or was reused from an earlier run or another worker."""
    by_layer = {}
    for stage in stages or ():
        if stage["unit"] != "network":
            by_layer.update(dict.fromkeys(stage["layers"], stage))
    out = []
    for row in rows:
        stage = by_layer.get(row["layer"])
        extra = (
            (stage["unit"], stage["error_start"], stage["error_end"], stage["codes_changed"])
            if stage
            else (None,) * len(RECONSTRUCTION_COLUMNS)
        )
        out.append({**row, **dict(zip(RECONSTRUCTION_COLUMNS, extra, strict=True))})
    return out


BUDGET_COLUMNS = ("choice", "sensitivity")


def with_budget(rows: Sequence[dict[str, Any]], budget: Any) -> list[dict[str, Any]]:
    """``rows`` (the budgeted method's layers.csv rows) with each layer's chosen method and
    its measured sensitivity (``--bits-budget``)."""
    chosen = {c.layer: c for c in budget.chosen}
    return [
        {**row, "choice": chosen[row["layer"]].method,
         "sensitivity": chosen[row["layer"]].sensitivity}
        for row in rows
    ]  # fmt: skip


def layers_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``layers.csv``: one line per (method, rank, layer); with ``--bits-budget``, the budgeted
    layers' choice and sensitivity; with ``--reconstruct``, each layer's block and its errors."""
    import pandas as pd

    columns = list(LAYER_COLUMNS)
    if any("choice" in row for row in rows):
        columns += BUDGET_COLUMNS
    if any("block" in row for row in rows):
        columns += RECONSTRUCTION_COLUMNS
    frame = pd.DataFrame(list(rows), columns=columns)
    return frame.to_csv(index=False, float_format="%.6g")


def load_adapted(model: ImageModel, path: Any, device: Any = "cpu") -> AdaptedNetwork:
    """The adapted network a whole-network checkpoint holds, on the uncompressed ``model``
    (whose other layers come from the backbone's weights)."""
    from train_evaluate.outputs.checkpoint import install_network, read_packed_network

    packed = read_packed_network(path, device)
    network = model.wrap(install_network(model.model, packed)).to(model.mean.device)
    return AdaptedNetwork(network, list(packed.layers))
