"""--bits-budget's measured options, kept in the run folder layer by layer: a run stopped
during the measurement (an hour and more for ``kl-reconstructed`` on a real network) resumes
at the first layer it had not finished, and a later run of the same folder with other budgets
solves them on the same numbers.

The file is trusted only under the key of everything the measurement depends on, and only when
its content matches the digest it was written with; otherwise the options are measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from train_evaluate.inputs.features import feature_key
from train_evaluate.runtime.files import read_json, write_json
from train_evaluate.training.budget import LayerChoice

log = logging.getLogger("train_model")

FILE = "budget-sensitivities.json"
FORMAT = 1  # raise when a sensitivity is computed otherwise: older files are then measured again


def measurement_key(plan: Any, features_key: str, prices: list[list[int]]) -> str:
    """Everything a layer's options and their sensitivities depend on: the images, model,
    weights and layers (``features_key``), the split and its seed, each method's compressor (in
    the run's order), the ranks, the options' bits as this run prices them (``prices``:
    ``budget.shape_prices``, so that a change in the accounting is never read back), the
    adapter's init and storage, the fits, the calibration, the sensitivity and, for
    ``kl-reconstructed``, the reconstruction it prices the options after; not the budgets, which
    the options serve alike."""
    network, sweep = plan.network, plan.sweep
    parts = {
        "format": FORMAT,
        "features": features_key,
        "split": [asdict(plan.fractions), sweep.seed],
        "compressions": [[name, config.describe()] for name, config in plan.compressions.items()],
        "ranks": list(plan.ranks),
        "prices": prices,
        "adapter": [sweep.init, sweep.use_dora, sweep.loftq_iters, plan.adapter_dtype],
        "include_bias": plan.include_bias,
        "fit": asdict(plan.fit),
        "calibration": network.calibration,
        "sensitivity": network.budget_sensitivity,
        "device": plan.device.type,
    }
    if network.budget_sensitivity == "kl-reconstructed":
        parts["reconstruction"] = asdict(network.sensitivity_reconstruction)
    return feature_key(**parts)


def _content(layers: dict[str, list[LayerChoice]]) -> dict[str, list[list]]:
    return {
        layer: [[c.method, c.rank, c.bits, c.sensitivity] for c in choices]
        for layer, choices in layers.items()
    }


def _digest(content: dict[str, list[list]]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_measured(path: Path, key: str, layers: dict[str, list[LayerChoice]]) -> None:
    """The layers measured so far, under ``key``, with the digest of their content (replaced
    whole: a stop while writing leaves the previous file)."""
    content = _content(layers)
    write_json(path, {"format": FORMAT, "key": key, "digest": _digest(content), "layers": content})


def read_measured(path: Path, key: str) -> dict[str, list[LayerChoice]]:
    """The layers ``path`` holds for ``key``; none when it is missing, measured under another
    key, or does not match its digest."""
    found = read_json(path)
    if found is None:
        return {}
    if not isinstance(found, dict) or found.get("key") != key:
        log.info("bit budget: %s was measured with other settings; measuring again", path.name)
        return {}
    content = found.get("layers")
    try:
        if _digest(content) != found.get("digest"):
            raise ValueError("its digest does not match")
        layers = {layer: [_choice(layer, e) for e in entries] for layer, entries in content.items()}
    except (AttributeError, TypeError, ValueError) as error:
        log.warning("bit budget: %s is damaged (%s); measuring again", path.name, error)
        return {}
    log.info("bit budget: %d layers' options read back from %s", len(layers), path.name)
    return layers


def _choice(layer: str, entry: list) -> LayerChoice:
    method, rank, bits, sensitivity = entry
    # a NaN or infinite sensitivity is kept: the solver refuses it by name, as when measured
    kinds = (method, str), (rank, int), (bits, int), (sensitivity, float)
    if not all(isinstance(value, kind) for value, kind in kinds):
        raise ValueError(f"an option of {layer} is not a measured one: {entry}")
    return LayerChoice(layer, method, rank, bits, sensitivity)
