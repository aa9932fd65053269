"""The frozen backbone: a timm classifier with pretrained weights (hub or local file).

Everything before the classifier is frozen, so the model is only ever used in eval mode to turn
images into pre-logits features (``forward_features`` then ``forward_head(pre_logits=True)``);
the classifier's own weight and bias are read with timm's ``get_classifier()``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn


class BackboneError(ValueError):
    """The model or its weights cannot be loaded; the message says what to do."""


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise BackboneError(
            f"unknown timm model {name!r}; list the valid names with "
            "python -c \"import timm; print(timm.list_models('*resnet*'))\""
        )


def classifier_shape(name: str) -> tuple[int, int]:
    """(out, in) of the model's classifier, read without allocating its weights."""
    try:
        with torch.device("meta"):
            head = timm.create_model(name, pretrained=False).get_classifier()
    except Exception as error:  # a model that cannot be built without extra arguments
        raise BackboneError(f"cannot build timm model {name}: {error}") from error
    if not isinstance(head, nn.Linear):
        raise BackboneError(f"{name}'s classifier is {type(head).__name__}, not a Linear layer")
    return head.out_features, head.in_features


def create_backbone(name: str, weights: Path | None, device: torch.device) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, weights from ``weights`` when given.

    A local file goes through timm's own pretrained-weight path (``pretrained_cfg_overlay``
    with ``file=``), so timm's checks and key filters apply exactly as for hub weights.
    """
    check_model_name(name)
    overlay = {"file": str(weights)} if weights is not None else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as error:  # timm raises many types here; all mean "these weights won't do"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if weights is not None:
            raise BackboneError(f"cannot load weights {weights} into {name}: {detail}") from error
        raise BackboneError(
            f"cannot fetch pretrained weights for {name} ({detail}); with no internet, pass a "
            "local state dict with --weights FILE"
        ) from error
    return model.eval().requires_grad_(False).to(device)


def weights_id(name: str, weights: Path | None) -> str:
    """What identifies the weights: the file's SHA-256, or the hub tag timm resolves."""
    if weights is None:
        return f"hub:{timm.models.get_pretrained_cfg(name).hf_hub_id or name}"
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def eval_transform(model: nn.Module):
    """timm's own preprocessing for this model (its pretrained config): resize, crop, normalise."""
    return create_transform(**resolve_data_config({}, model=model))


def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's input for a batch of images (N x in)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def classifier(model: nn.Module) -> nn.Linear:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise BackboneError(f"the model's classifier is {type(head).__name__}, not nn.Linear")
    return head


def tensor_bits(module: nn.Module) -> int:
    """Bits of the floating-point parameters and buffers of ``module`` at their stored dtype."""
    return sum(
        t.numel() * t.element_size() * 8
        for t in module.state_dict().values()
        if t.is_floating_point()
    )
