"""Build a ``LoraLinear`` from a dense Linear layer, and put one into a timm model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compression import compress
from lora.config import LoraConfig
from lora.inits import InitContext, get_init
from lora.layer import LoraLinear, check_rank


def make_init_context(
    linear: nn.Linear, compression: Any, features: torch.Tensor | None = None
) -> InitContext:
    """Compress ``linear``'s weight once; the context is reused for every rank and trial."""
    weight = linear.weight.detach()
    return InitContext(weight, compress(weight, compression), compression, features)


def make_lora_linear(
    linear: nn.Linear,
    config: LoraConfig,
    context: InitContext,
    generator: torch.Generator | None = None,
) -> LoraLinear:
    """A ``LoraLinear`` whose frozen base holds W_c (and ``linear``'s bias, untouched) and whose
    adapter is initialised by ``config.init``. ``linear`` itself is not modified."""
    check_rank(config.r, linear.out_features, linear.in_features)
    base = nn.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        base.weight.copy_(context.base_weight)
        if linear.bias is not None:
            base.bias.copy_(linear.bias)
    layer = LoraLinear(base, config.r, config.lora_alpha, use_dora=config.use_dora)
    layer.base_compressed = context.compressed
    get_init(config.init)(layer, context, config, generator)
    if layer.use_dora:
        # m = ||W_c + s * B @ A|| per row: at init DoRA computes exactly what plain LoRA does.
        with torch.no_grad():
            layer.lora_magnitude.copy_(layer.direction().norm(dim=1))
    return layer


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("the classifier returned by get_classifier() is not a submodule of the model")


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
    name = _module_name(model, head)
    layer = make_lora_linear(
        head, config, make_init_context(head, compression, features), generator
    )
    model.requires_grad_(False)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    for param in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
        if param is not None:
            param.requires_grad_(True)
    return layer
