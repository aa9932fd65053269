"""Packed checkpoints: a compressed FC and its adapter as a small safetensors file (no pickle).

Tensors:
  ``base.<part>``   the compressor's stored parts (``CompressedWeight.parts``); integer parts
                    (signs, block positions, N-bit codes) bit-packed at exactly their width
  ``lora_A``, ``lora_B`` (and DoRA's ``lora_magnitude``)   at the adapter dtype (fp32 default)
  ``bias``          fp32, untouched (absent when the layer has none)
Metadata (safetensors' string map):
  ``format``        ``lora-compression-packed/1``
  ``checkpoint``    JSON: method and compressor config, layer shape, rank, alpha, init, DoRA,
                    adapter dtype, each part's dtype / shape / code width, and the writer's extras
                    (model, weights, metrics)
  ``sha256``        digest of every tensor's bytes in name order: a flipped byte is detected

Loading expands the parts back into W_c bit for bit (``compression.expand``), so with an fp32
adapter the rebuilt layer computes exactly what the trained one did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compression import (
    CompressedWeight,
    StorageCost,
    expand,
    make_config,
    method_of,
    pack_codes,
    unpack_codes,
)
from lora import LoraLinear
from train_evaluate.files import atomic_path

FORMAT = "lora-compression-packed/1"
ADAPTER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """The file is not a sound packed checkpoint; the message says why."""


@dataclass
class PackedCheckpoint:
    layer: LoraLinear
    info: dict[str, Any]


def digest(tensors: dict[str, torch.Tensor], info: str) -> str:
    """SHA-256 over the JSON metadata and every tensor's name, dtype, shape and bytes."""
    hasher = hashlib.sha256(info.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        hasher.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def write_packed(
    path: Path, layer: LoraLinear, adapter_dtype: str = "fp32", extra: dict | None = None
) -> int:
    """Write ``layer`` (its compressed base and adapter) to ``path``; returns the file's bytes."""
    compressed = layer.base_compressed
    if compressed is None:
        raise ValueError("the layer's base was not made by a compressor: nothing to pack")
    config = compressed.config
    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, Any]] = {}
    for name, part in compressed.parts.items():
        entry = {"dtype": str(part.dtype).removeprefix("torch."), "shape": list(part.shape)}
        if name in compressed.codes:
            entry["bits"] = compressed.codes[name]
            tensors[f"base.{name}"] = pack_codes(part, entry["bits"])
        else:
            tensors[f"base.{name}"] = part.detach().cpu().contiguous()
        parts[name] = entry
    dtype = ADAPTER_DTYPES[adapter_dtype]
    for name, value in layer.adapter_state().items():
        tensors[name] = value.to(dtype).cpu().contiguous()
    if layer.base_layer.bias is not None:
        tensors["bias"] = layer.base_layer.bias.detach().cpu().contiguous()
    info = {
        **(extra or {}),
        "method": method_of(config),
        "compression": asdict(config),
        "shape": [layer.out_features, layer.in_features],
        "rank": layer.r,
        "lora_alpha": layer.lora_alpha,
        "use_dora": layer.use_dora,
        "adapter_dtype": adapter_dtype,
        "cost": asdict(compressed.cost),
        "parts": parts,
    }
    text = json.dumps(info)
    metadata = {"format": FORMAT, "checkpoint": text, "sha256": digest(tensors, text)}
    with atomic_path(Path(path)) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return Path(path).stat().st_size


def read_packed(path: Path, device: torch.device | str = "cpu") -> PackedCheckpoint:
    """Rebuild the layer from a packed file; CheckpointError if the file is not sound."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors reports a bad header or a short file in many types
        raise CheckpointError(
            f"{path} is not a readable packed checkpoint (safetensors header: {error})"
        ) from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    if digest(tensors, metadata.get("checkpoint", "")) != metadata.get("sha256"):
        raise CheckpointError(
            f"{path} is corrupted: its tensors and metadata do not match their sha256"
        )
    info = json.loads(metadata["checkpoint"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info["compression"].items()}
    config = make_config(info["method"], **fields)
    shape = tuple(info["shape"])
    parts = {}
    for name, entry in info["parts"].items():
        stored = tensors[f"base.{name}"]
        if "bits" in entry:
            count = int(torch.Size(entry["shape"]).numel())
            stored = unpack_codes(stored, entry["bits"], count).reshape(entry["shape"])
            stored = stored.to(getattr(torch, entry["dtype"]))
        parts[name] = stored
    weight = expand(parts, config, shape)
    base = nn.Linear(shape[1], shape[0], bias="bias" in tensors)
    with torch.no_grad():
        base.weight.copy_(weight)
        if "bias" in tensors:
            base.bias.copy_(tensors["bias"])
    layer = LoraLinear(base, info["rank"], info["lora_alpha"], use_dora=info["use_dora"])
    adapter = {
        k: tensors[k].float() for k in ("lora_A", "lora_B", "lora_magnitude") if k in tensors
    }
    layer.load_adapter_state(adapter)
    codes = {name: entry["bits"] for name, entry in info["parts"].items() if "bits" in entry}
    layer.base_compressed = CompressedWeight(
        weight, StorageCost(**info["cost"]), parts, codes, config
    )
    return PackedCheckpoint(layer.to(device).eval(), info)


def write_merged(path: Path, layer: LoraLinear) -> int:
    """One dense FC, W_c + (alpha/r) B @ A (with DoRA's magnitudes), and the bias, in fp32.

    For deployment without this tool: any framework can load it, and it gives up the
    compression (the file is as large as the original FC).
    """
    with torch.no_grad():
        tensors = {"weight": layer.merged_weight().detach().cpu().contiguous()}
        if layer.base_layer.bias is not None:
            tensors["bias"] = layer.base_layer.bias.detach().cpu().contiguous()
    with atomic_path(Path(path)) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "dense-linear", "note": "merged"})
    return Path(path).stat().st_size
