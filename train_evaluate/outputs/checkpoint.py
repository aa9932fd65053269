"""Packed checkpoints: compressed layers and their adapters as a small safetensors file (no
pickle). One layout for the FC study's one layer and a network's many (``NETWORK_FORMAT``).

Tensors, per layer ``<name>`` (the module it replaces, e.g. ``fc`` or ``blocks.0.conv_pw``):
  ``<name>/base.<part>``   the compressor's stored parts (``CompressedWeight.parts``); integer
                           parts (signs, block positions, N-bit codes) bit-packed at exactly
                           their width
  ``<name>/lora_A``, ``<name>/lora_B`` (and DoRA's ``lora_magnitude``)   at the adapter dtype
  ``<name>/bias``          fp32, untouched (absent when the layer has none)
Metadata (safetensors' string map, written in key order):
  ``format``        ``lora-compression-packed-network/1``
  ``checkpoint``    JSON: the writer's extras (model, weights, metrics, the layer plan) and, per
                    layer under ``layers``, its method and compressor config, shape, rank,
                    alpha, DoRA, adapter dtype, each part's dtype / shape / code width
  ``sha256``        digest of every tensor's bytes in name order and of the JSON

Loading checks the metadata against itself and the tensors (a file edited with a recomputed
digest is refused in one line too), then expands the parts back into W_c bit for bit
(``compression.expand``), so with an fp32 adapter the rebuilt layer computes exactly what the
trained one did. Files of the first layout (``FORMAT``: one layer, its tensors and fields
unprefixed) are still read (``network_checkpoint.read_packed`` reads either).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compression import (
    CompressedLinear,
    CompressedWeight,
    compress,
    expand,
    list_methods,
    make_config,
    method_of,
    pack_codes,
    unpack_codes,
)
from lora import LoraConv2d, LoraLinear
from lora.rounding import (
    ADAPTER_FLOAT_DTYPES,
    ADAPTER_FORMATS,
    ADAPTER_INT_BITS,
    factor_config,
    rounded_factors,
)
from train_evaluate.runtime.files import digest, read_safetensors, write_safetensors

FORMAT = "lora-compression-packed/1"


class CheckpointError(ValueError):
    """The file is not a sound packed checkpoint; the message says why."""


@dataclass
class PackedCheckpoint:
    layer: LoraLinear
    info: dict[str, Any]


def pack_layer(
    layer: nn.Module, adapter_dtype: str = "fp32"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of one compressed layer with its adapter. A conv's adapter is
    stored as its matrix factors (A: r x in*kh*kw, B: out x r), the same numbers as PEFT's
    conv shapes; its geometry is in ``conv``."""
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
    tensors.update(pack_adapter(layer, adapter_dtype))
    if layer.base_layer.bias is not None:
        tensors["bias"] = layer.base_layer.bias.detach().cpu().contiguous()
    info = {
        "method": method_of(config),
        "compression": stored_fields(config),
        "shape": [layer.out_features, layer.in_features],
        "rank": layer.r,
        "lora_alpha": layer.lora_alpha,
        "use_dora": layer.use_dora,
        "adapter_dtype": adapter_dtype,
        "cost": asdict(compressed.cost),
        "parts": parts,
    }
    if isinstance(layer, LoraConv2d):
        conv = layer.base_layer
        info["conv"] = {
            "in_channels": conv.in_channels,
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": list(conv.padding) if not isinstance(conv.padding, str) else conv.padding,
            "dilation": list(conv.dilation),
            "padding_mode": conv.padding_mode,
        }
        # written only where they differ from a plain conv's, so that earlier files keep
        # their bytes
        if conv.groups != 1:
            info["conv"]["groups"] = conv.groups
        if conv.pads_from_input:
            info["conv"]["pads_from_input"] = True
    return tensors, info


def pack_adapter(layer: nn.Module, adapter_dtype: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors: A and B as matrices at a float dtype, or (int8 / int4) each as
    ``<name>.codes`` (packed at exactly N bits) and ``<name>.scale`` (fp32, one per row): the
    factors rounded, which leaves the ones ``round_adapter_`` rounded as they are; DoRA's
    magnitudes at the float dtype, or fp32."""
    if layer.r == 0:
        return {}  # no adapter (a rank-0 layer): nothing stored
    tensors = {}
    state = layer.adapter_state()
    bits = ADAPTER_INT_BITS.get(adapter_dtype)
    if bits is not None:
        for name, rounded in rounded_factors(layer, bits).items():
            tensors[f"{name}.codes"] = pack_codes(rounded.parts["codes"], bits)
            tensors[f"{name}.scale"] = rounded.parts["scale"].detach().float().cpu().contiguous()
            del state[name]
    dtype = ADAPTER_FLOAT_DTYPES.get(adapter_dtype, torch.float32)
    for name, value in state.items():
        if name in ("lora_A", "lora_B"):
            value = value.flatten(1)
        tensors[name] = value.to(dtype).cpu().contiguous()
    return tensors


def _unpack_adapter(
    tensors: dict[str, torch.Tensor], adapter: dict[str, tuple[int, ...]], adapter_dtype: str, why
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The adapter state a file holds (float32) and the names of its tensors."""
    bits = ADAPTER_INT_BITS.get(adapter_dtype)
    state, names = {}, set()
    for name, shape in adapter.items():
        if bits is None or name not in ("lora_A", "lora_B"):
            dtype = ADAPTER_FLOAT_DTYPES.get(adapter_dtype, torch.float32)
            _check_tensor(tensors, name, shape, dtype, why)
            state[name] = tensors[name].float()
            names.add(name)
            continue
        rows, cols = shape
        codes, scale = f"{name}.codes", f"{name}.scale"
        _check_tensor(tensors, scale, (rows, 1), torch.float32, why)
        _check_tensor(tensors, codes, (-(-rows * cols * bits // 8),), torch.uint8, why)
        levels = 2 ** (bits - 1) - 1
        values = unpack_codes(tensors[codes], bits, rows * cols)
        require(
            values.numel() == 0 or int(values.max()) <= 2 * levels,
            f"{codes} holds codes past the {bits}-bit range",
        )
        parts = {"codes": values.reshape(rows, cols).to(torch.uint8), "scale": tensors[scale]}
        state[name] = expand(parts, factor_config(bits), (rows, cols))
        names.update((codes, scale))
    return state, names


def save_packed(path: Path, tensors: dict[str, torch.Tensor], info: dict, fmt: str) -> int:
    text = json.dumps(info)
    metadata = {"format": fmt, "checkpoint": text, "sha256": digest(tensors, text)}
    write_safetensors(Path(path), tensors, metadata)
    return Path(path).stat().st_size


def write_packed(
    path: Path,
    layers: Mapping[str, nn.Module] | nn.Module,
    adapter_dtype: str | Mapping[str, str] = "fp32",
    extra: dict | None = None,
    name: str = "layer",
) -> int:
    """Write adapted layers (their compressed bases and adapters) to ``path``; returns the
    file's bytes. ``layers``: module name -> adapted layer (``Target.adapters_of`` gives a
    model's), or one layer alone, stored as ``name``. ``adapter_dtype``: how every adapter is
    stored, or each layer's (module name -> dtype, as ``LayerPlan.adapter_dtypes`` gives
    them). One layout for one layer or many:
    ``network_checkpoint.read_packed`` reads a file of one, ``read_packed_network`` any."""
    if not isinstance(layers, Mapping):
        layers = {name: layers}
    return write_packed_network(path, layers, adapter_dtype, extra)


def inconsistent(path: Path | str, error: Exception) -> CheckpointError:
    reason = " ".join(str(error).split())
    return CheckpointError(
        f"{path} is not a consistent packed checkpoint: {reason} (edited metadata? write it "
        "again with the driver)"
    )


class Unsound(Exception):
    """One reason the metadata and tensors of a file do not agree (read_packed adds the path)."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unsound(reason)


def _check_tensor(
    tensors: dict[str, torch.Tensor],
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    why: str,
) -> None:
    require(name in tensors, f"tensor {name} is missing")
    tensor = tensors[name]
    require(
        tuple(tensor.shape) == shape,
        f"{name} has shape {tuple(tensor.shape)}, but {why} needs {shape}",
    )
    require(tensor.dtype == dtype, f"{name} is {tensor.dtype}, but {why} needs {dtype}")


def _layer_fields(info: Any) -> tuple[tuple[int, int], int, float, bool, str]:
    """(shape, rank, alpha, DoRA, adapter dtype), each checked for type and range."""
    require(isinstance(info, dict), "its metadata is not a JSON object")
    shape = info.get("shape")
    require(
        isinstance(shape, list) and len(shape) == 2 and all(is_int(n) and n > 0 for n in shape),
        f"layer shape {shape!r} is not two positive integers (out, in)",
    )
    out_features, in_features = shape
    rank = info.get("rank")
    limit = min(out_features, in_features)
    require(
        is_int(rank) and 0 <= rank <= limit,
        f"rank {rank!r} is not an integer in 0..{limit} (a {out_features} x {in_features} layer)",
    )
    alpha = info.get("lora_alpha")
    require(
        isinstance(alpha, int | float)
        and not isinstance(alpha, bool)
        and math.isfinite(alpha)
        and alpha > 0,
        f"lora_alpha {alpha!r} is not a positive number",
    )
    use_dora = info.get("use_dora")
    require(isinstance(use_dora, bool), f"use_dora {use_dora!r} is not true or false")
    require(not (use_dora and rank == 0), "a layer of rank 0 (no adapter) has no DoRA magnitude")
    adapter_dtype = info.get("adapter_dtype")
    require(
        adapter_dtype in ADAPTER_FORMATS,
        f"adapter dtype {adapter_dtype!r} is not one of {', '.join(ADAPTER_FORMATS)}",
    )
    return (out_features, in_features), rank, float(alpha), use_dora, adapter_dtype


def check_plan(plan: Any, stored: dict[str, tuple[dict[str, Any], nn.Module]]) -> None:
    """The layer plan a file records (``lora.plan``; files written before plans were recorded
    have none) names exactly its layers (``stored``: name -> (its metadata, its rebuilt
    layer)), each with its method, its adapter's dtype and a rank that, clamped to the layer,
    is the adapter's."""
    require(isinstance(plan, dict) and isinstance(plan.get("layers"), dict),
             "its layer plan has no layers")  # fmt: skip
    planned = plan["layers"]
    require(set(planned) == set(stored),
             f"its layer plan names {len(planned)} layers, its tensors hold {len(stored)} "
             "others")  # fmt: skip
    for name, (info, layer) in stored.items():
        entry = planned[name]
        require(isinstance(entry, dict) and is_int(entry.get("rank")),
                 f"its layer plan's {name} has no rank")  # fmt: skip
        clamped = min(entry["rank"], layer.in_features, layer.out_features)
        require(entry.get("method") == info["method"] and clamped == layer.r,
                 f"its layer plan gives {name} {entry.get('method')} r={entry['rank']}; the "
                 f"layer holds {info['method']} r={layer.r}")  # fmt: skip
        dtype = entry.get("adapter_dtype", plan.get("adapter_dtype"))
        require(dtype == info["adapter_dtype"],
                f"its layer plan stores {name}'s adapter as {dtype}; the layer holds "
                f"{info['adapter_dtype']}")  # fmt: skip


def _compressor_config(info: dict[str, Any]) -> Any:
    """The compressor's config; it must be exactly what the writer stores for that method."""
    method = info.get("method")
    require(
        method in list_methods(),
        f"unknown compression method {method!r} (valid: {', '.join(list_methods())})",
    )
    fields = info.get("compression")
    require(isinstance(fields, dict), f"compression config {fields!r} is not a JSON object")
    try:
        config = make_config(
            method, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        )
    except (ValueError, TypeError) as error:
        raise Unsound(f"compression config {fields} is not valid for {method}: {error}") from error
    # make_config ignores unknown fields and fills in the ones a method name fixes (int4 ->
    # bits=4): a config that does not round-trip was not written by write_packed. A field the
    # file lacks must hold its default: files written before the field existed (int_scale).
    written = json.loads(json.dumps(asdict(config)))
    defaults = {
        f.name: json.loads(json.dumps(f.default))
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING
    }
    absent = written.keys() - fields.keys()
    absent_at_default = all(name in defaults and written[name] == defaults[name] for name in absent)
    require(
        {k: v for k, v in written.items() if k in fields} == fields
        and absent_at_default
        and method_of(config) == method,
        f"compression config {fields} is not what method {method} stores",
    )
    return config


# Config fields added after files of their method were first written: written only when not
# at their default, so that a file of the default compressor keeps the bytes it had before.
LATER_FIELDS = ("quantizer", "int_grid", "scale_dtype")


def stored_fields(config: Any) -> dict[str, Any]:
    """The compressor's config as a file stores it (``read`` fills in what is left out)."""
    fields = asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return {k: v for k, v in fields.items() if k not in LATER_FIELDS or v != defaults[k]}


def _reference(config: Any, shape: tuple[int, int], dtype: torch.dtype) -> CompressedWeight:
    try:
        return compress(torch.zeros(shape, dtype=dtype), config)
    except (ValueError, RuntimeError, MemoryError) as error:  # e.g. a block far past the layer
        reason = f"{config} cannot compress a {shape[0]} x {shape[1]} layer ({error})"
        raise Unsound(reason) from error


def _expected_parts(
    info: dict[str, Any], tensors: dict[str, torch.Tensor], config: Any, shape: tuple[int, int]
) -> CompressedWeight:
    """What the compressor stores for this config and shape, checked against the file.

    The names, shapes and code widths of a compressor's parts depend on the layer's shape and
    the config only, never on the weight's values: compressing a zero matrix of that shape gives
    the reference layout (and the storage cost) the file must match exactly.
    """
    parts = info.get("parts")
    require(
        isinstance(parts, dict) and all(isinstance(e, dict) for e in parts.values()),
        f"parts {parts!r} is not a JSON object of part entries",
    )
    stored = {name[len("base.") :]: t for name, t in tensors.items() if name.startswith("base.")}
    expected = _reference(config, shape, torch.float32)
    names = sorted(expected.parts)
    require(
        sorted(parts) == names and sorted(stored) == names,
        f"{info['method']} on a {shape[0]} x {shape[1]} layer stores parts {names}; the "
        f"metadata lists {sorted(parts)} and the file holds {sorted(stored)}",
    )
    # the values and scales are stored at the weight's own dtype (fp32 from the driver)
    float_dtypes = {stored[name].dtype for name in names if name not in expected.codes}
    require(
        len(float_dtypes) <= 1 and all(d.is_floating_point for d in float_dtypes),
        f"the stored values have dtypes {sorted(map(str, float_dtypes))}, not one float dtype",
    )
    dtype = next(iter(float_dtypes), torch.float32)
    if dtype != torch.float32:
        expected = _reference(config, shape, dtype)
    for name, reference in expected.parts.items():
        entry, tensor = parts[name], stored[name]
        want = {
            "dtype": str(reference.dtype).removeprefix("torch."),
            "shape": list(reference.shape),
        }
        if name in expected.codes:
            want["bits"] = expected.codes[name]
            packed = (reference.numel() * want["bits"] + 7) // 8
            require(
                tensor.dtype == torch.uint8 and tuple(tensor.shape) == (packed,),
                f"part {name} should be {packed} packed bytes; it is {tensor.dtype} "
                f"{tuple(tensor.shape)}",
            )
        else:
            require(
                tuple(tensor.shape) == tuple(reference.shape),
                f"part {name} has shape {tuple(tensor.shape)}; expected {tuple(reference.shape)}",
            )
        require(entry == want, f"part {name} is described as {entry}; expected {want}")
    cost = info.get("cost")
    require(
        cost == asdict(expected.cost),
        f"storage cost {cost} is not the {asdict(expected.cost)} that this layout takes",
    )
    return expected


def rebuild_layer(info: Any, tensors: dict[str, torch.Tensor]) -> LoraLinear:
    """The layer a sound file describes; Unsound with the first inconsistency otherwise."""
    shape, rank, alpha, use_dora, adapter_dtype = _layer_fields(info)
    out_features, in_features = shape
    why = f"rank {rank} on a {out_features} x {in_features} layer ({info['adapter_dtype']})"
    # rank 0: no adapter, so no adapter tensor
    adapter = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)} if rank else {}
    if use_dora:
        adapter["lora_magnitude"] = (out_features,)
    state, adapter_tensors = _unpack_adapter(tensors, adapter, adapter_dtype, why)
    if "bias" in tensors:
        _check_tensor(tensors, "bias", (out_features,), torch.float32, "an fp32 bias")
    config = _compressor_config(info)
    expected = _expected_parts(info, tensors, config, shape)
    known = {f"base.{n}" for n in expected.parts} | adapter_tensors | {"bias"}
    strangers = sorted(set(tensors) - known)
    require(not strangers, f"it holds tensors no packed layer has: {', '.join(strangers)}")
    parts = {}
    for name, reference in expected.parts.items():
        stored = tensors[f"base.{name}"]
        if name in expected.codes:
            codes = unpack_codes(stored, expected.codes[name], reference.numel())
            stored = codes.reshape(reference.shape).to(reference.dtype)
        parts[name] = stored
    try:
        weight = expand(parts, config, shape)
    except (ValueError, RuntimeError, IndexError) as error:  # e.g. a position past its block
        raise Unsound(f"its parts do not rebuild the compressed weight ({error})") from error
    require(tuple(weight.shape) == shape, f"its parts rebuild a {tuple(weight.shape)} weight")
    stored = CompressedWeight(weight, expected.cost, parts, dict(expected.codes), config)
    base = CompressedLinear.from_compressed(stored, tensors.get("bias"))
    layer = LoraLinear(base, rank, alpha, use_dora=use_dora)
    layer.load_adapter_state(state)
    return layer


def read_verified(path: Path | str, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        metadata, tensors = read_safetensors(path)
    except Exception as error:  # safetensors reports a bad header or a short file in many types
        detail = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable packed checkpoint (safetensors header: {detail})"
        ) from error
    if metadata.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {fmt} checkpoint")
    if digest(tensors, metadata.get("checkpoint", "")) != metadata.get("sha256"):
        raise CheckpointError(
            f"{path} is corrupted: its tensors and metadata do not match their sha256"
        )
    return metadata, tensors


def packed_format(path: Path | str) -> str | None:
    """The ``format`` a packed file declares (None when it cannot be read at all)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception:  # any unreadable header: the readers say why in their own words
        return None


# --------------------------------------------------------------------- whole-network checkpoints

# One file for every compressed layer of a network: layer ``name``'s tensors are stored as
# ``<name>/base.<part>``, ``<name>/lora_A``... exactly as a one-layer file stores them, and its
# metadata under ``layers[name]``; one sha256 covers all tensors and the metadata. The rest of
# the network is not in the file: it comes from the backbone's own weights
# (``network_checkpoint`` reads it back).

NETWORK_FORMAT = "lora-compression-packed-network/1"


def write_packed_network(
    path: Path,
    adapters: Mapping[str, nn.Module],
    adapter_dtype: str | Mapping[str, str] = "fp32",
    extra: dict | None = None,
) -> int:
    """Every layer of ``adapters`` (module name -> adapted layer) in one file, each adapter
    stored as ``adapter_dtype`` says (one dtype, or module name -> dtype)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, adapter in adapters.items():
        dtype = adapter_dtype if isinstance(adapter_dtype, str) else adapter_dtype[name]
        layer_tensors, info = pack_layer(adapter, dtype)
        tensors.update({f"{name}/{key}": value for key, value in layer_tensors.items()})
        layers[name] = info
    return save_packed(path, tensors, {**(extra or {}), "layers": layers}, NETWORK_FORMAT)
