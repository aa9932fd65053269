"""The frozen backbone: a timm classifier with pretrained weights (hub or local file).

Everything before the classifier is frozen, so the model is only ever used in eval mode to turn
images into pre-logits features (``forward_features`` then ``forward_head(pre_logits=True)``);
the classifier's own weight and bias are read with timm's ``get_classifier()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
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
        if weights is not None:
            raise BackboneError(weights_problem(name, Path(weights), error)) from error
        raise BackboneError(
            f"cannot fetch pretrained weights for {name} ({first_line(error)}); with no internet, "
            "pass a local state dict with --weights FILE"
        ) from error
    # a NaN or infinity would surface far later, as a failed SVD or an empty budget frontier
    damaged = [
        key for key, value in model.state_dict().items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]  # fmt: skip
    if damaged:
        source = (
            f"weights {weights}" if weights is not None else f"the pretrained weights of {name}"
        )
        more = f" and {len(damaged) - 1} more tensors" if len(damaged) > 1 else ""
        raise BackboneError(
            f"{source} hold NaN or infinite values in {damaged[0]}{more}; pass intact weights"
        )
    return model.eval().requires_grad_(False).to(device)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def weights_problem(name: str, weights: Path, error: Exception) -> str:
    """Why timm could not load ``weights`` into ``name``, in one line that says what to do.

    Reads the file the way timm does (safetensors, or ``torch.load`` with ``weights_only``,
    unwrapping ``state_dict`` / ``model`` entries) and compares it with the model's own keys
    and shapes; timm's first line only when neither explains the failure.
    """
    try:
        state = timm.models.load_state_dict(str(weights))
        shapes = {key: tuple(value.shape) for key, value in state.items()}
    except Exception:  # not safetensors, not a pickle of plain tensors, not a dict of tensors
        return (
            f"weights {weights} are not a readable state dict or checkpoint; pass a safetensors "
            "file or a torch.save() of model.state_dict() (plain tensors only, no pickled code)"
        )
    try:
        mismatch = describe_mismatch(name, shapes)
    except Exception:  # a model that cannot be built bare: timm's own words will have to do
        mismatch = ""
    if mismatch:
        return f"weights {weights} do not fit {name}: {mismatch}; pass weights of {name}"
    return f"cannot load weights {weights} into {name}: {first_line(error)}"


def describe_mismatch(name: str, shapes: dict[str, tuple[int, ...]], shown: int = 3) -> str:
    """The first ``shown`` missing keys, unexpected keys and shape mismatches of a state dict
    with these ``shapes`` against model ``name``; empty if keys and shapes all agree."""
    with torch.device("meta"):  # shapes only: no memory for the weights
        expected = {k: tuple(v.shape) for k, v in timm.create_model(name).state_dict().items()}

    def listed(what: str, items: list[str]) -> str:
        more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
        return f"{what} {', '.join(items[:shown])}{more}"

    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    resized = [
        f"{k} {list(shapes[k])} vs {list(expected[k])}"
        for k in expected
        if k in shapes and shapes[k] != expected[k]
    ]
    parts = [
        listed(what, items)
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", resized),
        )
        if items
    ]
    return "; ".join(parts)


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


def layer_weights(module: nn.Module) -> int:
    """How many weights the Linear and Conv2d layers of ``module`` hold (depthwise convs and
    timm's own-forward subclasses such as ``Conv2dSame`` included; a layer reachable under two
    names once): the denominator of ``model_bits_per_weight``."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d))


def tensor_bits(module: nn.Module) -> int:
    """Bits of the floating-point parameters and buffers of ``module`` at their stored dtype."""
    return sum(
        t.numel() * t.element_size() * 8
        for t in module.state_dict().values()
        if t.is_floating_point()
    )


def bits_outside(model: nn.Module, names: Iterable[str]) -> int:
    """``tensor_bits`` of ``model`` but for the modules ``names`` (the selected layers): what
    the rest of the model stores beside them."""
    return tensor_bits(model) - sum(tensor_bits(model.get_submodule(name)) for name in names)
