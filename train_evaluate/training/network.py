"""Whole-network mode: compress any chosen set of a timm model's Linear and Conv2d layers.

The FC-only study is the case of one selected layer, the classifier, and keeps its own path
(pre-logits features cached, base logits computed once). Any other selection (which layers:
``train_evaluate.inputs.selection``; the cached images and states:
``train_evaluate.inputs.images``; what they store: ``train_evaluate.outputs.accounting``) runs
here:

- ``NetworkMethod``: one compressor applied to every selected layer; per rank, the layers are
  compressed and their adapters initialised in forward order, an activation-aware init seeing
  the inputs that the already compressed prefix produces (``lora.calibration``), then
  reconstructed if asked (``lora.reconstruction``);
- ``AdaptedNetwork``: the compressed network with its adapters, trained together by the shared
  training loop (the frozen part stays in eval mode: BatchNorm statistics never move);
- ``NetworkSetup``: what every method of a run shares (the model, the selected layers, the
  calibration images, the accounting template).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression import StorageCost, compress, compress_, replace_submodule, weight_matrix
from lora import LoraConfig
from lora.attach import attach_adapters_
from lora.calibration import calibrate_sequentially, compress_sequentially
from lora.inits import DEFAULT_FIT, FitConfig
from lora.plan import LayerPlan, LayerSpec
from lora.reconstruction import (
    NO_RECONSTRUCTION,
    ReconstructionConfig,
    UnitRecord,
    learned_bases,
    reconstruct,
    reconstruction_units,
)
from train_evaluate.inputs.images import EVAL_CHUNK, ImageModel
from train_evaluate.inputs.selection import LayerInfo, describe_layers
from train_evaluate.outputs.accounting import Accounting

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32

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
    """The whole network's ``Target`` (``training.target``): a compressor on every selected
    layer (or one per layer, from a plan); shared by all ranks and trials of a run.

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
    # a choice per layer (--bits-budget, --layer-plan): each layer's compressor and requested
    # rank (``config`` is then a budget.PerLayerCompression, and the rank a row names the
    # largest of them)
    plan: LayerPlan | None = None
    fit: FitConfig = DEFAULT_FIT  # --fit-ridge, --asymmetric-strength
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
        plan: LayerPlan | None = None,
        fit: FitConfig = DEFAULT_FIT,
    ) -> NetworkMethod:
        method = cls(
            name, config, model, tuple(layers), calibration, (), asymmetric=asymmetric,
            reconstruction=reconstruction, units=tuple(units), plan=plan, fit=fit,
        )  # fmt: skip
        targets = method.targets()
        method.costs = tuple(
            compress(weight_matrix(model.model.get_submodule(info.name)), targets[info.name]).cost
            for info in layers
        )
        return method

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
        if self.plan is None:
            return {info.name: self.config for info in self.layers}
        configs = {layer: config for layer, _, config, _ in self.config.layers}
        return {info.name: configs[info.name] for info in self.layers}

    def requested_ranks(self, rank: int) -> dict[str, int]:
        """Each selected layer's requested rank for the rows of ``rank``."""
        if self.plan is None:
            return {info.name: rank for info in self.layers}
        specs = self.plan.specs()
        return {info.name: specs[info.name].rank for info in self.layers}

    def layer_plan(self, rank: int, adapter_dtype: str) -> LayerPlan:
        """The plan of this method's models at ``rank`` (what ``--layer-plan`` reads back)."""
        if self.plan is not None:
            return self.plan
        spec = LayerSpec(self.name, rank)
        return LayerPlan(self.name, tuple((info.name, spec) for info in self.layers), adapter_dtype)

    def descriptions(self) -> dict[str, str]:
        """Each method's full description (what a plan file records beside its name)."""
        if self.plan is None:
            return {self.name: self.config.describe()}
        return {method: config.describe() for _, method, config, _ in self.config.layers}

    def compressed_model(self, sweep: Any = None) -> ImageModel:
        """Every selected layer compressed, no adapters: the ``quantized`` row. A calibrated
        compressor compresses in forward order on the calibration images' inputs. Given the
        ``sweep``, a plan of rank 0 everywhere takes it from the rank-0 contexts, which its one
        row needs anyway: the same model bit for bit (a rank-0 layer adds nothing, so each
        calibration pass sees what it sees here; the stored codes, before any learned
        rounding), for one calibration pass instead of two."""
        from compression import uses_inputs

        if sweep is not None and self.plan is not None and self.plan.rank == 0:
            built = self._build(0, 8.0, sweep, 0, self.contexts(0, sweep))
            return built.network.requires_grad_(False).eval()
        network = copy.deepcopy(self.model)
        targets = self.targets()
        if any(uses_inputs(config) for config in targets.values()):
            compress_sequentially(
                network.model,
                targets,
                lambda: self._calibration_batches(),
                positions=self.positions,
                asymmetric=self.asymmetric,
                fit=self.fit,
            )
            return network.requires_grad_(False).eval()
        compress_(network.model, targets.__getitem__, lambda _module, name: name in targets)
        return network.requires_grad_(False).eval()

    def adapters_of(self, model: AdaptedNetwork) -> dict[str, nn.Module]:
        return model.adapters()

    def load(self, path: Path, device: torch.device | str) -> AdaptedNetwork:
        """The adapted network a checkpoint of this method holds, on the uncompressed model."""
        return load_adapted(self.model, path, device)

    def _calibration_batches(self) -> Iterator[torch.Tensor]:
        device = next(self.model.parameters()).device
        for chunk in self.calibration.split(CALIBRATION_BATCH):
            yield self.model.preprocess(chunk.to(device))

    def lora_config(self, info: LayerInfo, rank: int, alpha: float, sweep: Any) -> LoraConfig:
        if self.plan is not None:
            rank = self.plan.specs()[info.name].rank
        return LoraConfig(
            r=info.rank(rank),
            lora_alpha=alpha,
            init=sweep.init,
            use_dora=sweep.use_dora and info.rank(rank) > 0,  # rank 0: no adapter
            loftq_iters=sweep.loftq_iters,
        )

    def contexts(self, rank: int, sweep: Any) -> dict[str, Any]:
        """Each layer's InitContext for ``rank``, computed sequentially in forward order once."""
        key = _rank_key(rank, sweep)
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
                fit=self.fit,
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
        # in forward order: paper_init's random draws come in that order
        configs = {info.name: self.lora_config(info, rank, alpha, sweep) for info in self.layers}
        attach_adapters_(network.model, configs, contexts, generator)
        return AdaptedNetwork(network, self.names())

    def adapted(self, rank: int, alpha: float, sweep: Any, seed: int) -> AdaptedNetwork:
        """A fresh compressed network with adapters of ``rank`` (clamped per layer), ``alpha``
        and ``seed`` (the random draws of paper_init, in forward order). After
        ``--reconstruct``, every adapter starts from its reconstructed tensors whatever the
        seed, B rescaled so that scaling * B @ A is the reconstructed delta at any alpha."""
        contexts = self.contexts(rank, sweep)
        key = _rank_key(rank, sweep)
        if self.reconstruction.enabled and key not in self._learned:
            # once per rank, when its first model is asked for (not by the quantized row, which
            # may share the contexts, nor for a rank a resumed run already finished)
            with torch.enable_grad():  # it trains, whatever the caller's grad mode
                self._learned = {key: self._reconstruct(rank, sweep, contexts)}
        network = self._build(rank, alpha, sweep, seed, contexts)
        learned = self._learned.get(key)
        if learned:
            for name, adapter in network.adapters().items():
                state, scaling, base = learned[name]
                state = dict(state, lora_B=state["lora_B"] * (scaling / adapter.scaling))
                adapter.load_adapter_state(state)
                if base is not None:  # --quantizer adaround: the learned codes
                    adapter.base_layer.set_compressed(base)
        return network


def _rank_key(rank: int, sweep: Any) -> tuple:
    """What a rank's contexts and reconstruction depend on besides the method."""
    return (rank, sweep.init, sweep.loftq_iters)


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
    template: Accounting
    asymmetric: bool = False
    reconstruction: ReconstructionConfig = NO_RECONSTRUCTION
    units: tuple[tuple[str, tuple[str, ...]], ...] = ()
    fit: FitConfig = DEFAULT_FIT

    @classmethod
    def create(cls, plan: Any, model: ImageModel, train: Any, adapter_dtype: str) -> NetworkSetup:
        from lora.cut import boundaries
        from train_evaluate.inputs.backbone import bits_outside, layer_weights
        from train_evaluate.inputs.images import calibration_views
        from train_evaluate.training.training import derive_seed

        net = plan.network
        rows = calibration_rows(len(train), net.calib_images, plan.sweep.seed)
        # train rows alone, never a label: --calib-augment's views are drawn from their pixels
        calibration = calibration_views(
            train.features[rows.to(train.features.device)],
            net.calib_augment,
            derive_seed(plan.sweep.seed, "calibration views"),
        )
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
        template = Accounting(
            layers,
            (),
            adapter_dtype,
            plan.sweep.use_dora,
            plan.include_bias,
            bits_outside(model.model, [info.name for info in layers]),
            f"{net.selection} ({len(layers)} layers)",
            layer_weights(model),
        )
        asymmetric = net.calibration == "asymmetric"
        reconstruction = net.reconstruction
        units = ()
        if reconstruction.enabled:
            units = tuple(
                reconstruction_units([info.name for info in layers], boundaries(model.model))
            )
        return cls(
            model, layers, calibration, template, asymmetric, reconstruction, units, plan.fit
        )

    def method(self, name: str, config: Any) -> NetworkMethod:
        return NetworkMethod.create(
            name, config, self.model, self.layers, self.calibration, self.asymmetric,
            self.reconstruction, self.units, fit=self.fit,
        )  # fmt: skip

    def planned_method(self, plan: LayerPlan, compressions: dict[str, Any]) -> NetworkMethod:
        """The method of a plan (a solved ``--bits-budget``'s, or ``--layer-plan``'s): each
        layer with its own compressor and rank; named as the plan is."""
        from train_evaluate.training.budget import PerLayerCompression

        specs = plan.specs()  # in forward order, as every other list of the layers
        plan = replace(plan, layers=tuple((info.name, specs[info.name]) for info in self.layers))
        return NetworkMethod.create(
            plan.name, PerLayerCompression.of(plan, compressions), self.model, self.layers,
            self.calibration, self.asymmetric, self.reconstruction, self.units, plan=plan,
            fit=self.fit,
        )  # fmt: skip

    def accounting(self, method: NetworkMethod) -> Accounting:
        if method.plan is None:
            return replace(self.template, costs=method.costs)
        dtypes = method.plan.adapter_dtypes()
        return replace(
            self.template,
            costs=method.costs,
            ranks=tuple(method.requested_ranks(method.plan.rank).values()),
            adapter_dtypes=tuple(dtypes[info.name] for info in self.layers),
        )


def load_adapted(model: ImageModel, path: Any, device: Any = "cpu") -> AdaptedNetwork:
    """The adapted network a whole-network checkpoint holds, on the uncompressed ``model``
    (whose other layers come from the backbone's weights)."""
    from train_evaluate.outputs.network_checkpoint import install_network, read_packed_network

    packed = read_packed_network(path, device)
    # ``model`` is the run's own, whose selected convs have their BatchNorms folded in already
    installed = install_network(model.model, packed, folded_already=True)
    network = model.wrap(installed).to(model.mean.device)
    return AdaptedNetwork(network, list(packed.layers))
