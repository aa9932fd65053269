"""A packed checkpoint in use outside the driver: ``load_into`` puts its classifier into a
user's own timm model, and ``write_merged`` / ``merged_linear`` give one dense FC for a
deployment without this tool (giving up the compression)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora import LoraLinear
from lora.attach import classifier_name
from train_evaluate.outputs.checkpoint import CheckpointError
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.runtime.files import write_safetensors


def write_merged(path: Path, layer: LoraLinear, metadata: dict[str, str] | None = None) -> int:
    """One dense FC, W_c + (alpha/r) B @ A (with DoRA's magnitudes), and the bias, in fp32.

    For deployment without this tool: any framework can load it, and it gives up the
    compression (the file is as large as the original FC). ``metadata``: safetensors' string
    map, to say which model, weights and layer the FC belongs to (see evaluate.py).
    """
    with torch.no_grad():
        tensors = {"weight": layer.merged_weight().detach().cpu().contiguous()}
        if layer.base_layer.bias is not None:
            tensors["bias"] = layer.base_layer.bias.detach().cpu().contiguous()
    strings = {"format": "dense-linear", "note": "merged", **(metadata or {})}
    write_safetensors(Path(path), tensors, {k: str(v) for k, v in strings.items()})
    return Path(path).stat().st_size


def merged_linear(layer: LoraLinear) -> nn.Linear:
    """A plain ``nn.Linear`` computing what ``layer`` computes (one dense weight, fp32)."""
    merged = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.base_layer.bias is not None,
        device=layer.base_layer.weight.device,
    )
    with torch.no_grad():
        merged.weight.copy_(layer.merged_weight())
        if layer.base_layer.bias is not None:
            merged.bias.copy_(layer.base_layer.bias)
    return merged.requires_grad_(False).eval()


def load_into(model: nn.Module, path: Path | str, *, merge: bool = False) -> nn.Module:
    """Put a packed checkpoint's classifier into a timm model; returns the model.

    The file is verified (read_packed), its layer shape must be the model's classifier's, and
    its model name (when it records one) must be the same architecture. The classifier is then
    replaced by the rebuilt ``LoraLinear`` (compressed base + adapter, exactly the trained
    layer), or with ``merge=True`` by one dense ``nn.Linear`` (W_c + (alpha/r) B A, fp32).
    """
    name = classifier_name(model)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the model's classifier {name} is {type(head).__name__}, not nn.Linear "
            "(create the model with its classes, num_classes > 0)"
        )
    packed = read_packed(path, head.weight.device)
    wanted = tuple(packed.info["shape"])
    if wanted != (head.out_features, head.in_features):
        raise CheckpointError(
            f"{path} holds a {wanted[0]} x {wanted[1]} classifier; this model's {name} is "
            f"{head.out_features} x {head.in_features}"
        )
    recorded = packed.info.get("model")
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if isinstance(recorded, str) and architecture and recorded.split(".")[0] != architecture:
        raise CheckpointError(f"{path} was trained for {recorded}; this model is {architecture}")
    layer = merged_linear(packed.layer) if merge else packed.layer
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer.to(dtype=head.weight.dtype))
    return model
