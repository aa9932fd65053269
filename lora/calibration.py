"""Calibrated, sequential, training-free initialisation of a whole network's adapters.

Activation-aware inits (``act_svd_init``, ``act_loftq_init``) need the second moment
C = X^T X / N of a layer's inputs. ``MomentAccumulator`` sums it from a forward pre-hook without
ever holding X. ``calibrate_sequentially`` compresses and adapts the selected layers one at a
time in forward order; with ``sequential=True`` layer k's moment is measured on the inputs that
layers 1..k-1, already compressed and adapted, produce (as GPTQ and EoRA do). The fit then
uses only the moment C~ = X~^T X~ / N of those perturbed inputs X~: it makes W_c + L imitate
the layer's own W on X~, minimising ||(W - W_c - L) X~||, so each adapter is fitted on the
inputs its layer will really see, but it does not correct the error that reaches the layer
from upstream. With ``asymmetric=True`` it does: the same pass also runs each batch through an
uncompressed copy of the network up to layer k, and ``CrossMomentAccumulator`` sums, on the
same rows, C~ and the cross-moment G = X^T X~ / N of the clean inputs X and the perturbed X~;
the act-aware inits then fit the clean outputs X W^T (``lora.inits.output_target``) and GPTQ
rounds towards them, as GPTAQ (Li et al. 2025, arXiv:2504.02692) does. Each of those passes
stops as soon as layer k has seen its input, so it costs a prefix of the network (two prefixes
when asymmetric), not all of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression.modules import (
    CompressedConv2d,
    CompressedLinear,
    compressible,
    conv_options,
    pad_from_input,
    weight_matrix,
)
from compression.registry import compress, uses_inputs
from lora.attach import make_adapter, make_init_context
from lora.capture import NotCalled, first_call, forward_order, run_until
from lora.config import LoraConfig
from lora.cut import CarriedStates
from lora.inits import (
    ACTIVATION_AWARE_INITS,
    DEFAULT_FIT,
    FitConfig,
    InitContext,
    compresses_target,
    output_target,
)
from lora.layer import check_rank


class MomentAccumulator:
    """X^T X (float64) and the row count of one Linear / Conv2d layer's inputs.

    Rows are what the layer's weight matrix multiplies: a Linear's input vectors, a conv's
    unfolded input patches (in*kh*kw, in the order of ``weight.reshape(out, -1)``). A conv
    contributes at most ``positions`` spatial positions per image and a Linear on token input
    (N, tokens, in) at most ``positions`` tokens per sample, drawn from a generator seeded with
    ``seed``: neighbouring positions are strongly correlated, so a few per image carry most of
    what all of them would, at a fraction of the cost.

    >>> with MomentAccumulator(layer) as accumulator:
    ...     model(images)
    >>> accumulator.moment()
    """

    def __init__(self, module: nn.Module, positions: int = 64, seed: int = 0) -> None:
        if not isinstance(module, nn.Linear | nn.Conv2d):
            raise ValueError(
                f"moments are kept for Linear and Conv2d layers; got {type(module).__name__}"
            )
        if positions < 1:
            raise ValueError(f"positions must be at least 1; got {positions}")
        self.module = module
        self.positions = positions
        self.generator = torch.Generator().manual_seed(seed)
        self.total: torch.Tensor | None = None
        self.rows = 0
        self._handle = None

    def _chosen(self, grouped: torch.Tensor) -> torch.Tensor | None:
        """For (N, L, d) rows, which min(L, positions) positions of each sample to keep (None:
        all of them)."""
        samples, length = grouped.shape[:2]
        if length <= self.positions:
            return None
        scores = torch.rand(samples, length, generator=self.generator)
        return scores.argsort(dim=1)[:, : self.positions].to(grouped.device)

    @staticmethod
    def _keep(grouped: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
        """(N, L, d) -> the chosen rows, (N * kept, d)."""
        if chosen is not None:
            grouped = grouped.gather(1, chosen.unsqueeze(-1).expand(-1, -1, grouped.shape[2]))
        return grouped.flatten(0, 1)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, d): per sample, the rows this layer's weight matrix multiplies (a Linear's
        2-D input is N samples of one row each, never subsampled)."""
        module = self.module
        if isinstance(module, nn.Linear):
            if x.ndim <= 2:
                return x.reshape(-1, 1, module.in_features)
            return x.reshape(x.shape[0], -1, module.in_features)
        x = pad_from_input(module, x)  # timm's Conv2dSame: padding 0 once x is padded
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # pad as the conv does ('same', or a non-zero padding mode), then unfold unpadded
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        else:
            padding = module.padding
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return patches.transpose(1, 2)

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """The input rows this layer's weight matrix multiplies, after subsampling."""
        grouped = self._grouped(x)
        return self._keep(grouped, self._chosen(grouped))

    def product(self, rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """rows^T other: (in x in); for a grouped conv, one block per group (groups x c x c,
        c = in/groups*kh*kw): a group's outputs read its own columns only, so the moment
        between two groups' inputs never enters its error, and at depthwise sizes the whole
        (in*kh*kw)^2 matrix would not fit in memory."""
        groups = getattr(self.module, "groups", 1)
        if groups == 1:
            return rows.T @ other
        rows, other = (t.reshape(t.shape[0], groups, -1) for t in (rows, other))
        return torch.einsum("ngc,ngd->gcd", rows, other)

    def update(self, x: torch.Tensor) -> None:
        rows = self.rows_of(x.detach()).double()
        product = self.product(rows, rows)
        self.total = product if self.total is None else self.total + product
        self.rows += rows.shape[0]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        """The forward pre-hook: accumulate this call's input."""
        self.update(args[0])

    def attach(self) -> MomentAccumulator:
        if self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> MomentAccumulator:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def moment(self) -> torch.Tensor:
        """X^T X / N (in x in, float64; groups x c x c for a grouped conv) over every row seen
        so far."""
        if self.total is None:
            raise ValueError("no input reached the layer: no moment to report")
        return self.total / self.rows


class CrossMomentAccumulator(MomentAccumulator):
    """X~^T X~ and X^T X~ (float64) of one layer's perturbed inputs X~ and clean inputs X on
    the same rows: each ``update`` gets both inputs of one batch, and the same positions are
    kept from both (drawn as ``MomentAccumulator`` draws them for X~ alone, so ``moment()`` is
    the one a symmetric pass measures on the same X~). Fed by ``update``, not by a hook: the
    two inputs come from two networks."""

    def __init__(self, module: nn.Module, positions: int = 64, seed: int = 0) -> None:
        super().__init__(module, positions, seed)
        self.cross_total: torch.Tensor | None = None

    def update(self, clean: torch.Tensor, perturbed: torch.Tensor) -> None:  # type: ignore[override]
        clean, perturbed = self._grouped(clean.detach()), self._grouped(perturbed.detach())
        if clean.shape != perturbed.shape:
            raise ValueError(
                f"clean and perturbed inputs differ in shape: {tuple(clean.shape)} and "
                f"{tuple(perturbed.shape)}"
            )
        chosen = self._chosen(perturbed)
        x, x_tilde = self._keep(clean, chosen).double(), self._keep(perturbed, chosen).double()
        product, cross = self.product(x_tilde, x_tilde), self.product(x, x_tilde)
        self.total = product if self.total is None else self.total + product
        self.cross_total = cross if self.cross_total is None else self.cross_total + cross
        self.rows += x_tilde.shape[0]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        raise TypeError("a CrossMomentAccumulator is fed by update(clean, perturbed), not a hook")

    def cross_moment(self) -> torch.Tensor:
        """G = X^T X~ / N (in x in, float64): rows index clean inputs, columns perturbed."""
        if self.cross_total is None:
            raise ValueError("no input reached the layer: no moment to report")
        return self.cross_total / self.rows


def _batches(calibration: Iterable | Callable[[], Iterable]) -> Iterable:
    return calibration() if callable(calibration) else calibration


def _input(batch: Any, device: torch.device | None) -> torch.Tensor:
    # a DataLoader yields (images, labels): the images are the model's input
    x = batch[0] if isinstance(batch, tuple | list) else batch
    return x if device is None else x.to(device)


def _device(model: nn.Module) -> torch.device | None:
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


def _cross_moments(
    clean_model: nn.Module,
    model: nn.Module,
    name: str,
    clean_batches: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    positions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C~, G) of layer ``name`` over every calibration batch: each runs through the
    uncompressed ``clean_model`` up to the layer (X) and its counterpart through ``model``, whose
    earlier layers are compressed (X~), in the same pass over the batches."""
    module = model.get_submodule(name)
    accumulator = CrossMomentAccumulator(module, positions)
    for clean_x, x in zip(clean_batches, batches, strict=True):
        try:
            clean, _ = first_call(clean_model, clean_model.get_submodule(name), clean_x)
            perturbed, _ = first_call(model, module, x)
        except NotCalled:
            raise ValueError("the forward pass never called the layer being calibrated") from None
        accumulator.update(clean, perturbed)
    return accumulator.moment(), accumulator.cross_moment()


def _carried(
    model: nn.Module,
    clean: nn.Module | None,
    calibration: Iterable | Callable[[], Iterable],
    carry: bool,
) -> CarriedStates:
    """The sequential passes over the calibration batches: ``model`` (and ``clean``, when the
    fit is asymmetric), their states carried from block boundary to block boundary."""
    device = _device(model)
    batches = [_input(batch, device) for batch in _batches(calibration)]
    networks = {"model": model} if clean is None else {"model": model, "clean": clean}
    return CarriedStates(networks, batches, carry)


def _layer_moments(
    carried: CarriedStates, name: str, positions: int, crossed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``name``'s input moment in the network as it is now, and when ``crossed`` the
    cross-moment of its clean and perturbed inputs (None otherwise)."""
    started = carried.before(name)
    network, batches = started["model"]
    if not crossed:
        module = network.get_submodule(name)
        return input_moments(network, {name: module}, batches, positions)[name], None
    clean, clean_batches = started["clean"]
    return _cross_moments(clean, network, name, clean_batches, batches, positions)


def input_moments(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calibration: Iterable | Callable[[], Iterable],
    positions: int,
) -> dict[str, torch.Tensor]:
    """The input moment X^T X / N (float64) of each of ``modules`` (given in forward order) over
    every calibration batch, at most ``positions`` positions per sample, from passes that stop
    at the last of them; the model as it is (no layer replaced)."""
    accumulators = {name: MomentAccumulator(m, positions) for name, m in modules.items()}
    last = next(reversed(modules.values()))
    device = _device(model)
    for accumulator in accumulators.values():
        accumulator.attach()
    try:
        for batch in _batches(calibration):
            run_until(model, _input(batch, device), last)
    finally:
        for accumulator in accumulators.values():
            accumulator.detach()
    return {name: accumulator.moment() for name, accumulator in accumulators.items()}


def _calibration_order(
    model: nn.Module, modules: dict[str, nn.Module], calibration: Iterable | Callable[[], Iterable]
) -> list[str]:
    """The names of ``modules`` in the order the forward pass on the first calibration batch
    calls them; ValueError when there is no batch or the pass never calls one of them."""
    first = next(iter(_batches(calibration)), None)
    if first is None:
        raise ValueError("calibrated inits and compressors need calibration batches; got none")
    order = forward_order(model, _input(first, _device(model)), modules)
    unseen = sorted(set(modules) - set(order))
    if unseen:
        raise ValueError(f"the forward pass never calls {', '.join(unseen)}")
    return order


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module may be reachable under several names)."""
    places = [
        (parent, child_name)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if child is old
    ]
    for parent, child_name in places:
        setattr(parent, child_name, new)


def calibrate_sequentially(
    model: nn.Module,
    targets: dict[str, Any],
    lora_config_for: Callable[[str, nn.Module], LoraConfig],
    calibration: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
    *,
    generator: torch.Generator | None = None,
    sequential: bool = True,
    positions: int = 64,
    asymmetric: bool = False,
    fit: FitConfig = DEFAULT_FIT,
    carry: bool = True,
) -> dict[str, tuple[nn.Module, InitContext]]:
    """Compress and adapt the layers named in ``targets`` (name -> compressor config) in place.

    ``lora_config_for(name, module)`` gives each layer's adapter config; a rank outside
    0..min(out, in*kh*kw) (0: no adapter) raises check_rank's ValueError before anything is
    changed (clamping is the caller's choice). ``calibration``: batches of model input (a
    tensor, or a tuple whose first item is one, as a DataLoader yields), read several times: a
    list, a DataLoader, or a callable returning a fresh iterable. ``positions``: at most this
    many positions (conv) or tokens per sample feed each moment.

    Layers are handled in forward order. A layer whose init is activation-aware gets the moment
    of its inputs: with ``sequential`` measured with the layers before it already compressed
    and adapted, one prefix pass over the calibration batches per such layer; otherwise from
    the uncompressed model, in one pass before anything is replaced. Other inits need no
    forward pass. Runs under no_grad with the model in eval mode (every module's mode is
    restored afterwards; an adapter takes the mode of the layer it replaces); requires_grad
    of the rest of the model is left alone.

    ``asymmetric`` (needs ``sequential``): a layer with an act-aware init or a GPTQ compressor
    also gets the cross-moment of its clean inputs (from an uncompressed copy of ``model``, on
    the same batches, in the same pass) and its perturbed ones, and fits the full-precision
    outputs instead of its own weight on the perturbed inputs (``lora.inits.output_target``).
    ``fit``: the ridge and asymmetric strength of those fits (``lora.inits.FitConfig``).
    ``carry``: each sequential pass starts from the states at the deepest verified block boundary
    before its layer (``lora.cut.CarriedStates``), kept from the pass before, instead of from the
    inputs; the calibration batches and those states are held in memory.

    Returns {name: (adapter, its InitContext)}; the contexts keep the moments, so adapters for
    another lora_alpha can be rebuilt with ``make_adapter(adapter.base_layer, config, context)``
    and no forward pass.
    """
    modules: dict[str, nn.Module] = {}
    for name in targets:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"the model has no layer named {name!r}") from error
        reason = compressible(modules[name])
        if reason is not None:
            raise ValueError(f"cannot compress {name}: {reason}")
    configs = {name: lora_config_for(name, module) for name, module in modules.items()}
    for name, module in modules.items():
        check_rank(configs[name].r, *weight_matrix(module).shape, configs[name].use_dora)
    # layers whose init or compressor reads the inputs
    aware = {
        name
        for name, config in configs.items()
        if config.init in ACTIVATION_AWARE_INITS or uses_inputs(targets[name])
    }
    if aware and not callable(calibration) and iter(calibration) is calibration:
        raise ValueError(
            "calibration batches are read several times: pass a list, a DataLoader or a "
            "callable returning a fresh iterable, not a one-shot iterator"
        )
    if asymmetric and not sequential:
        raise ValueError(
            "asymmetric calibration corrects the error of the compressed layers before each "
            "layer: it needs sequential=True (without it every layer sees clean inputs)"
        )
    # layers whose fit changes when it targets the clean outputs
    crossed = {
        name
        for name in aware
        if asymmetric
        and (configs[name].init in ACTIVATION_AWARE_INITS or compresses_target(targets[name]))
    }

    modes = {module: module.training for module in model.modules()}
    model.eval()
    # the clean inputs come from the network as it was before any layer is replaced
    clean = copy.deepcopy(model) if crossed else None
    results: dict[str, tuple[nn.Module, InitContext]] = {}
    try:
        with torch.no_grad():
            # order matters only when a layer's moment depends on the layers before it
            order = _calibration_order(model, modules, calibration) if aware else list(modules)
            moments: dict[str, torch.Tensor] = {}
            cross: dict[str, torch.Tensor] = {}
            if aware and not sequential:
                chosen = {name: modules[name] for name in order if name in aware}
                moments = input_moments(model, chosen, calibration, positions)
            if aware and sequential:
                carried = _carried(model, clean, calibration, carry)
            for name in order:
                module = modules[name]
                if name in aware and sequential:
                    moments[name], found = _layer_moments(carried, name, positions, name in crossed)
                    if found is not None:
                        cross[name] = found
                context = make_init_context(
                    module,
                    targets[name],
                    moment=moments.get(name),
                    cross_moment=cross.get(name),
                    fit=fit,
                )
                adapter = make_adapter(module, configs[name], context, generator).eval()
                modes.update(dict.fromkeys(adapter.modules(), modes[module]))
                _swap(model, module, adapter)
                results[name] = (adapter, context)
    finally:
        for module, training in modes.items():
            module.training = training
    return results


def compress_sequentially(
    model: nn.Module,
    targets: dict[str, Any],
    calibration: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
    *,
    positions: int = 64,
    asymmetric: bool = False,
    fit: FitConfig = DEFAULT_FIT,
    carry: bool = True,
) -> None:
    """Replace each layer named in ``targets`` (name -> compressor config) by its compressed
    module, in place and in forward order, no adapters. A calibrated compressor (GPTQ, the
    input-weighted mse scale) sees the moment of the inputs that the already compressed layers
    before it produce, as GPTQ does it; the others need no forward pass. ``asymmetric``: GPTQ
    rounds towards the least-squares target of the clean outputs (``lora.inits.output_target``,
    as GPTAQ does), from the cross-moment of clean and perturbed inputs, with ``fit``'s ridge and
    strength. ``carry``: as in ``calibrate_sequentially``."""
    modules = {name: model.get_submodule(name) for name in targets}
    calibrated = {name for name in modules if uses_inputs(targets[name])}
    crossed = {name for name in calibrated if asymmetric and compresses_target(targets[name])}
    modes = {module: module.training for module in model.modules()}
    model.eval()
    clean = copy.deepcopy(model) if crossed else None
    try:
        with torch.no_grad():
            order = list(modules)
            if calibrated:
                order = _calibration_order(model, modules, calibration)
                carried = _carried(model, clean, calibration, carry)
            for name in order:
                module = modules[name]
                weight = weight_matrix(module).detach()
                moment = None
                if name in calibrated:
                    moment, cross = _layer_moments(carried, name, positions, name in crossed)
                if name in crossed:
                    weight = output_target(
                        weight, moment, cross, fit.ridge, fit.asymmetric_strength
                    ).to(weight.dtype)
                result = compress(weight, targets[name], moment)
                if isinstance(module, nn.Conv2d):
                    replacement = CompressedConv2d.from_compressed(
                        result, module.bias, **conv_options(module)
                    )
                else:
                    replacement = CompressedLinear.from_compressed(result, module.bias)
                replacement = replacement.to(module.weight.device).eval()
                _swap(model, module, replacement)
    finally:
        for module, training in modes.items():
            module.training = training
