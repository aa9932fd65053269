"""Packed checkpoints read back (``checkpoint`` writes them): a file of one layer
(``read_packed``, either layout) or of many (``read_packed_network``), every layer rebuilt
and checked, and ``install_network``, which puts the layers into a model, each checked
against the module it replaces."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.modules import pads_from_input
from lora import LoraConv2d, LoraLinear
from train_evaluate.outputs.checkpoint import (
    FORMAT,
    NETWORK_FORMAT,
    CheckpointError,
    PackedCheckpoint,
    Unsound,
    check_plan,
    inconsistent,
    packed_format,
    read_verified,
    rebuild_layer,
    require,
)


@dataclass
class PackedNetwork:
    layers: dict[str, nn.Module]  # name -> rebuilt LoraLinear / LoraConv2d
    info: dict[str, Any]


def _conv_layer(linear: LoraLinear, conv: Any) -> LoraConv2d:
    """The conv layer whose matrix view ``linear`` (rebuilt from the file) is."""
    from compression import CompressedConv2d

    require(isinstance(conv, dict), f"conv geometry {conv!r} is not a JSON object")
    try:
        options = {key: tuple(conv[key]) for key in ("kernel_size", "stride", "dilation")} | {
            "in_channels": conv["in_channels"],
            "padding": conv["padding"]
            if isinstance(conv["padding"], str)
            else tuple(conv["padding"]),
            "padding_mode": conv["padding_mode"],
            "groups": conv.get("groups", 1),
            "pads_from_input": conv.get("pads_from_input", False),
        }
        require(isinstance(options["groups"], int) and options["groups"] >= 1,
                f"groups {options['groups']!r} is not a positive integer")  # fmt: skip
        require(isinstance(options["pads_from_input"], bool),
                f"pads_from_input {options['pads_from_input']!r} is not true or false")  # fmt: skip
        base = CompressedConv2d.from_compressed(
            linear.base_compressed, linear.base_layer.bias, **options
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise Unsound(f"conv geometry {conv} does not fit the layer ({error})") from error
    layer = LoraConv2d(base, linear.r, linear.lora_alpha, use_dora=linear.use_dora)
    state = linear.adapter_state()
    state["lora_A"] = state["lora_A"].view_as(layer.lora_A)
    state["lora_B"] = state["lora_B"].view_as(layer.lora_B)
    layer.load_adapter_state(state)
    return layer


def read_packed_network(path: Path | str, device: torch.device | str = "cpu") -> PackedNetwork:
    """Every layer of a whole-network file, rebuilt and checked as ``read_packed`` checks one;
    CheckpointError (one line) if the file is not sound."""
    metadata, tensors = read_verified(path, NETWORK_FORMAT)
    try:
        info = json.loads(metadata["checkpoint"])
        require(isinstance(info, dict) and isinstance(info.get("layers"), dict) and info["layers"],
                 "its metadata lists no layers")  # fmt: skip
        layers, claimed = {}, set()
        for name, layer_info in info["layers"].items():
            own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
            claimed.update(f"{name}/{k}" for k in own)
            try:
                linear = rebuild_layer(layer_info, own)
                conv = layer_info.get("conv")
                layers[name] = linear if conv is None else _conv_layer(linear, conv)
            except Unsound as error:
                raise Unsound(f"layer {name}: {error}") from error
        strangers = sorted(set(tensors) - claimed)
        require(not strangers, f"it holds tensors of no listed layer: {', '.join(strangers[:3])}")
        if "layer_plan" in info:
            stored = {name: (info["layers"][name], layer) for name, layer in layers.items()}
            check_plan(info["layer_plan"], stored)
        folded = info.get("folded_batchnorm", {})
        require(isinstance(folded, dict) and all(isinstance(v, str) for v in folded.values()),
                f"folded_batchnorm {folded!r} is not a map of conv to BatchNorm names")  # fmt: skip
        strays = sorted(set(folded) - set(layers))
        require(not strays, f"it folds a BatchNorm into {', '.join(strays[:3])}, which it does "
                            "not hold")  # fmt: skip
    except (Unsound, ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise inconsistent(path, error) from error
    return PackedNetwork({n: m.to(device).eval() for n, m in layers.items()}, info)


def read_layer_file(path: Path | str, device: torch.device | str = "cpu") -> PackedCheckpoint:
    """Rebuild the layer from a one-layer file of the first layout (``FORMAT``, written before
    every file was a network file; ``read_packed`` reads both); CheckpointError (one line) if
    it is not sound.

    Beyond the digest, which catches damage, the metadata is checked against itself and the
    tensors: a file edited with a recomputed digest (another rank, shape, method or parts) is
    refused with the first inconsistency rather than failing somewhere inside the rebuild.
    """
    metadata, tensors = read_verified(path, FORMAT)
    text = metadata.get("checkpoint", "")
    try:
        info = json.loads(text)
        layer = rebuild_layer(info, tensors)
        if "layer_plan" in info:
            plan = info["layer_plan"]
            planned = plan.get("layers") if isinstance(plan, dict) else None
            require(isinstance(planned, dict) and len(planned) == 1,
                    "its layer plan does not name the one layer it holds")  # fmt: skip
            check_plan(plan, {next(iter(planned)): (info, layer)})
    # Unsound: a check above; JSONDecodeError is a ValueError; the other types are a net for
    # what no check foresaw, so that any inconsistency is still one line, never a traceback
    except (Unsound, ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise inconsistent(path, error) from error
    return PackedCheckpoint(layer.to(device).eval(), info)


def read_packed(path: Path | str, device: torch.device | str = "cpu") -> PackedCheckpoint:
    """The one layer a packed file holds (the FC study's files), whichever layout wrote it: a
    network file of one layer, or a file of the first layout (``checkpoint.FORMAT``). Its
    ``info`` is the file's metadata with the layer's own entry merged in (method, rank, shape,
    ...) and ``layer``, the module it replaces. CheckpointError (one line) if it is not
    sound, or holds more than one layer."""
    if packed_format(path) != NETWORK_FORMAT:
        return read_layer_file(path, device)
    return the_one_layer(read_packed_network(path, device), path)


def the_one_layer(packed: PackedNetwork, path: Path | str) -> PackedCheckpoint:
    """A network file's one layer, its ``info`` the file's metadata with the layer's own entry
    merged in and ``layer``, the module it replaces; CheckpointError if it holds more."""
    if len(packed.layers) != 1:
        raise CheckpointError(
            f"{path} holds {len(packed.layers)} layers, not one: read it with "
            "read_packed_network (evaluate.py does)"
        )
    ((name, layer),) = packed.layers.items()
    shared = {key: value for key, value in packed.info.items() if key != "layers"}
    return PackedCheckpoint(layer, {**shared, **packed.info["layers"][name], "layer": name})


def verify_packed(path: Path | str) -> None:
    """Read a packed file of either kind; CheckpointError if it is not sound."""
    if packed_format(path) == NETWORK_FORMAT:
        read_packed_network(path)
    else:
        read_layer_file(path)


# What a Conv2d computes besides its weight: a file whose geometry differs from the model's
# layer (an edited padding, stride or dilation, with the digest recomputed) has the right
# weight shape but would fail deep inside the forward pass (or compute something else).
CONV_GEOMETRY = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def _check_geometry(name: str, current: nn.Module, stored: nn.Module) -> None:
    """CheckpointError naming the layer and the field where the file's layer ``stored`` does
    not compute on the same geometry as the model's ``current``."""
    wanted, found = _kind(stored), _kind(current)
    if wanted != found:
        raise CheckpointError(f"the checkpoint's {name} is a {wanted}; the model's is a {found}")
    if wanted != "Conv2d":
        return  # a Linear's geometry is its weight's shape, which the caller checks
    geometry = [(field, getattr(stored, field), getattr(current, field)) for field in CONV_GEOMETRY]
    geometry.append(("pads_from_input", pads_from_input(stored), pads_from_input(current)))
    for field, wanted, found in geometry:
        if wanted != found:
            raise CheckpointError(
                f"the checkpoint's {name} has {field} {_shown(wanted)}; the model's {name} has "
                f"{_shown(found)} (edited file? write it again with the driver)"
            )


def _kind(module: nn.Module) -> str:
    for kind in (nn.Conv2d, nn.Linear):
        if isinstance(module, kind):
            return kind.__name__
    return type(module).__name__


def _shown(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def take_out_folded(model: nn.Module, folded: dict[str, str], already: bool = False) -> None:
    """The BatchNorms a file folded into its convs (``folded``: conv -> BatchNorm), taken out
    of ``model`` in place as folding takes them out (their activation stays); ``already``:
    ``model`` is the folded model itself (the run that wrote the file), so none may be left."""
    from lora.folding import FOLDABLE, fold_batchnorm_

    modules = dict(model.named_modules())
    for conv, norm in folded.items():
        found = modules.get(norm)
        if already:
            if isinstance(found, FOLDABLE):
                raise CheckpointError(f"the checkpoint folds {norm} into {conv}; the model "
                                      "still has that BatchNorm")  # fmt: skip
            continue
        if not isinstance(found, FOLDABLE):
            raise CheckpointError(f"the checkpoint folds the BatchNorm {norm} into {conv}; "
                                  "the model has no BatchNorm there")  # fmt: skip
        channels = getattr(modules.get(conv), "out_channels", None)
        if found.num_features != channels:
            raise CheckpointError(f"the checkpoint folds {norm} ({found.num_features} channels)"
                                  f" into {conv} ({channels} out channels)")  # fmt: skip
    if not already:
        fold_batchnorm_(model, folded)


def install_network(
    model: nn.Module, packed: PackedNetwork, folded_already: bool = False
) -> nn.Module:
    """``model`` (a copy is made) with every layer of ``packed`` put in place of its module;
    each module must exist and have the layer's kind, shape and (a conv) geometry. The
    BatchNorms the file lists as folded are taken out (``take_out_folded``)."""
    import copy

    model = copy.deepcopy(model)
    take_out_folded(model, packed.info.get("folded_batchnorm", {}), folded_already)
    for name, layer in packed.layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError as error:
            raise CheckpointError(f"the model has no layer {name} (the checkpoint has)") from error
        _check_geometry(name, current, layer.base_layer)
        shape = tuple(getattr(current, "weight", torch.empty(0)).shape)
        if shape != tuple(layer.base_layer.weight.shape):
            raise CheckpointError(
                f"the checkpoint's {name} is {tuple(layer.base_layer.weight.shape)}; the "
                f"model's is {shape}"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(current.weight.device))
    return model.eval()
