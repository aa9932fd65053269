"""Build an adapter (``LoraLinear`` / ``LoraConv2d``) from a dense layer, and put one into a timm
model."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compression import compress
from compression.modules import (
    CompressedConv2d,
    CompressedLinear,
    conv_options,
    replace_submodule,
    weight_matrix,
)
from lora.config import LoraConfig
from lora.conv import LoraConv2d
from lora.inits import DEFAULT_FIT, FitConfig, InitContext, get_init
from lora.layer import LoraLinear, check_rank


def make_init_context(
    module: nn.Linear | nn.Conv2d,
    compression: Any,
    features: torch.Tensor | None = None,
    moment: torch.Tensor | None = None,
    cross_moment: torch.Tensor | None = None,
    fit: FitConfig = DEFAULT_FIT,
) -> InitContext:
    """Compress ``module``'s weight (a conv's as its matrix view, out x in*kh*kw) once; the
    context is reused for every rank and trial. ``features`` (N x in) or ``moment`` (in x in,
    X^T X / N) feed the activation-aware inits and calibrated compressors; ``cross_moment``
    (X^T X~ / N of clean and perturbed inputs) makes them asymmetric (``InitContext``); ``fit``:
    their ridge and asymmetric strength."""
    weight = weight_matrix(module).detach()
    context = InitContext(
        weight, None, compression, features, moment, cross_moment=cross_moment, fit=fit
    )
    # a calibrated compressor (GPTQ, the input-weighted mse scale) sees the same inputs; under
    # asymmetric calibration GPTQ rounds the target W_t (compress_target is W otherwise)
    context.compressed = compress(context.compress_target, compression, context.compress_moment)
    return context


def _initialise(layer: LoraLinear | LoraConv2d, config: LoraConfig, context, generator) -> None:
    if layer.r == 0:
        return  # no adapter: nothing to initialise, and no random number drawn
    get_init(config.init)(layer, context, config, generator)
    if layer.use_dora:
        # m = ||W_c + s * B @ A|| per output row (a conv's: over in, kh, kw): at init DoRA
        # computes exactly what plain LoRA does.
        with torch.no_grad():
            layer.lora_magnitude.copy_(layer.direction().flatten(1).norm(dim=1))


def make_lora_linear(
    linear: nn.Linear,
    config: LoraConfig,
    context: InitContext,
    generator: torch.Generator | None = None,
) -> LoraLinear:
    """A ``LoraLinear`` whose frozen base holds W_c (and ``linear``'s bias, untouched) and whose
    adapter is initialised by ``config.init``. ``linear`` itself is not modified."""
    check_rank(config.r, linear.out_features, linear.in_features, config.use_dora)
    base = CompressedLinear.from_compressed(context.compressed, linear.bias)
    base.to(linear.weight.device)
    layer = LoraLinear(base, config.r, config.lora_alpha, use_dora=config.use_dora)
    _initialise(layer, config, context, generator)
    return layer


def make_lora_conv2d(
    conv: nn.Conv2d,
    config: LoraConfig,
    context: InitContext,
    generator: torch.Generator | None = None,
) -> LoraConv2d:
    """A ``LoraConv2d`` whose frozen base holds W_c (``context`` is of ``conv``'s matrix view)
    with ``conv``'s bias and geometry, and whose adapter is initialised by ``config.init``.
    ``conv`` itself is not modified."""
    out_channels = conv.out_channels
    check_rank(config.r, out_channels, weight_matrix(conv).shape[1], config.use_dora)
    base = CompressedConv2d.from_compressed(context.compressed, conv.bias, **conv_options(conv))
    base.to(conv.weight.device)
    layer = LoraConv2d(base, config.r, config.lora_alpha, use_dora=config.use_dora)
    _initialise(layer, config, context, generator)
    return layer


def make_adapter(
    module: nn.Linear | nn.Conv2d,
    config: LoraConfig,
    context: InitContext,
    generator: torch.Generator | None = None,
) -> LoraLinear | LoraConv2d:
    """``make_lora_linear`` or ``make_lora_conv2d``, whichever ``module`` needs. ``module`` may be
    the dense layer or a compressed one (an adapter's ``base_layer``): only its bias and
    geometry are read; the base weight comes from ``context``."""
    if isinstance(module, nn.Conv2d):
        return make_lora_conv2d(module, config, context, generator)
    if isinstance(module, nn.Linear):
        return make_lora_linear(module, config, context, generator)
    raise ValueError(f"an adapter needs a Linear or Conv2d layer; got {type(module).__name__}")


def classifier_name(model: nn.Module) -> str:
    """Where a timm model keeps its classifier (``fc``, ``head``, ``head.fc``...).

    timm's pretrained config names it (``pretrained_cfg['classifier']``); the name is trusted
    only if it leads to the very module ``get_classifier()`` returns, else it is looked up.
    """
    if not hasattr(model, "get_classifier"):
        raise ValueError(f"{type(model).__name__} is not a timm model (it has no get_classifier)")
    head = model.get_classifier()
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(named, str) and named:
        with contextlib.suppress(AttributeError):
            if model.get_submodule(named) is head:
                return named
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise ValueError("the classifier returned by get_classifier() is not a submodule of the model")


def attach_adapters_(
    model: nn.Module,
    configs: Mapping[str, LoraConfig],
    contexts: Mapping[str, InitContext],
    generator: torch.Generator | None = None,
) -> dict[str, LoraLinear | LoraConv2d]:
    """Wrap, in place, each Linear / Conv2d that ``configs`` names with an adapter (PEFT's
    ``inject_adapter``, one ``LoraConfig`` per layer as its ``rank_pattern`` gives one), and
    freeze everything else: afterwards only the adapters' tensors require grad.

    ``contexts[name]``: the layer's ``InitContext`` (its compressed base and what its init
    fits). The layers are built in the order of ``configs``, the order in which random inits
    draw from ``generator``. Returns {name: adapter}."""
    adapters = {
        name: make_adapter(model.get_submodule(name), config, contexts[name], generator)
        for name, config in configs.items()
    }
    for name, adapter in adapters.items():
        replace_submodule(model, name, adapter)
    model.requires_grad_(False)
    for adapter in adapters.values():
        for param in (adapter.lora_A, adapter.lora_B, adapter.lora_magnitude):
            if param is not None:
                param.requires_grad_(True)
    return adapters


def attach_lora(
    model: nn.Module,
    compression: Any,
    config: LoraConfig,
    *,
    generator: torch.Generator | None = None,
    features: torch.Tensor | None = None,
) -> LoraLinear:
    """Compress a timm model's classifier, wrap it with an adapter, and freeze everything else.

    The classifier is found with timm's ``get_classifier()``. Afterwards only the adapter's
    tensors (``lora_A``, ``lora_B`` and DoRA's magnitude) require grad. Returns the new layer.
    """
    if not hasattr(model, "get_classifier"):
        raise ValueError("attach_lora needs a timm model (one with get_classifier())")
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the model's classifier is {type(head).__name__}, not nn.Linear; "
            "create the model with num_classes > 0"
        )
    name = classifier_name(model)
    context = make_init_context(head, compression, features)
    return attach_adapters_(model, {name: config}, {name: context}, generator)[name]
