"""A run's folder: one configuration per folder, held by one process at a time.

``run.json`` is written first, before any other output, with the configuration that every file
in the folder belongs to, and rewritten at the end with the run's results. A later run into the
same folder resumes it only when its configuration is the same (it may ask for more trials,
ranks, methods or final models: those extend the run); another configuration is refused in one
line, or with ``--overwrite`` the old outputs are removed first. So a folder never mixes the
files of two configurations, even after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from train_evaluate.runtime.errors import UsageError
from train_evaluate.runtime.files import read_json, write_json

FORMAT = "lora-compression-run/1"
LOCK = ".lock"
WRITE_LOCK = ".write.lock"
# What may change between runs that share a folder: these extend or narrow the run.
EXTENDABLE = ("trials", "final_seeds")


def folder_name(text: str) -> str:
    """A model or data name as one path component (timm tags keep their dot)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "data"


def run_config(plan: Any, weights_id: str) -> dict[str, Any]:
    """What the folder's outputs depend on (JSON-able). Ranks, methods, trial and final-model
    counts are left out: each rank's record carries its own key for those."""
    sweep = {k: v for k, v in asdict(plan.sweep).items() if k not in EXTENDABLE}
    config = {
        "model": plan.model,
        "weights": weights_id,
        "demo": plan.demo,
        "data": plan.source.fingerprint,
        "split": asdict(plan.fractions),
        "sweep": sweep,
        "compressions": {name: c.describe() for name, c in plan.compressions.items()},
        "adapter_dtype": plan.adapter_dtype,
        "include_bias": plan.include_bias,
        "device": plan.device.type,
    }
    if plan.decode != "cpu":  # absent for the default: older runs match
        config["decode"] = plan.decode
    if plan.search != "rank":
        config["search"] = plan.search
    if plan.storage is not None:  # the password hidden
        from train_evaluate.runtime.urls import shown

        config["storage"] = shown(plan.storage)
        config["study_prefix"] = plan.study_prefix
    if plan.fit != type(plan.fit)():  # absent for the default: older runs match
        config["fit"] = asdict(plan.fit)
    network = plan.network
    if network is not None:  # absent for the classifier alone: older FC runs still match
        config["network"] = {
            "layers": list(network.layers),
            "calib_images": network.calib_images,
        }
        if network.cut is not None:  # the states trained on: absent for the images
            config["network"]["cut"] = network.cut.module
        calibration = network.calibration
        if calibration != "symmetric":  # absent for the default: older runs still match
            config["network"]["calibration"] = calibration
        reconstruction = network.reconstruction
        if reconstruction.enabled:  # absent for none, as above
            settings = asdict(reconstruction)
            for key, default in (("weighting", "relative"), ("relaxation", "straight-through")):
                if settings[key] == default:  # absent for the default, as above
                    del settings[key]
            config["network"]["reconstruct"] = settings
    return json.loads(json.dumps(config))  # as it reads back from run.json (tuples -> lists)


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings that differ, each named by its path in run.json's config (the sweep's
    without the ``sweep.`` prefix) with both values; a method present in only one run is no
    conflict."""
    found = []
    for key in sorted(old.keys() | new.keys()):
        then, now = old.get(key), new.get(key)
        both = isinstance(then, dict) and isinstance(now, dict)
        if key == "compressions" and not prefix and both:
            common = then.keys() & now.keys()
            found += [f"compression of {m}" for m in sorted(common) if then[m] != now[m]]
        elif both:
            inner = "" if key == "sweep" and not prefix else f"{prefix}{key}."
            found += differences(then, now, inner)
        elif then != now:
            found.append(f"{prefix}{key} ({_shown(then)} there, {_shown(now)} here)")
    return found


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def holds_outputs(out: Path) -> bool:
    return out.is_dir() and any(p.name not in (LOCK, WRITE_LOCK) for p in out.iterdir())


def clear(out: Path) -> None:
    for path in out.iterdir():
        if path.name in (LOCK, WRITE_LOCK):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def claim(
    out: Path, config: dict[str, Any], overwrite: bool, options: dict[str, Any] | None = None
) -> None:
    """Make ``out`` this configuration's folder (the caller holds its lock), or refuse.
    ``options``: the command's options, recorded for ``--config`` to read back."""
    if holds_outputs(out):
        recorded = read_json(out / "run.json") or {}
        if recorded.get("format") != FORMAT or not isinstance(recorded.get("config"), dict):
            problem = "holds files that are not a run of this tool (no readable run.json)"
        else:
            changed = differences(recorded["config"], config)
            problem = f"holds a run with another {', '.join(changed)}" if changed else None
        if problem and not overwrite:
            raise UsageError(
                f"{out} {problem}; pass --overwrite to replace its outputs, or choose another --out"
            )
        if problem:
            clear(out)
    previous = read_json(out / "run.json") or {}
    recorded = {**previous, "format": FORMAT, "config": config}
    if options is not None:
        recorded["options"] = options
    write_json(out / "run.json", recorded)


def finish(out: Path, config: dict[str, Any], results: dict[str, Any]) -> None:
    options = (read_json(out / "run.json") or {}).get("options")
    recorded = {"format": FORMAT, "config": config, **results}
    write_json(out / "run.json", recorded if options is None else {**recorded, "options": options})


@contextlib.contextmanager
def exclusive(out: Path, shared: bool = False) -> Iterator[None]:
    """Hold ``out/.lock`` for the run: two runs writing one folder would fail each other's
    Optuna trials (a resume marks trials left running as failed) and mix their files. The
    operating system releases the lock when the process ends, killed or not.

    ``shared``: a launcher of a shared sweep (many workers, ``--storage``) holds it shared, so
    the launchers of one sweep, on several machines over a shared filesystem, may use one
    folder; a one-process run still excludes them all, and they it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise UsageError(
                f"another run is writing to {out}; wait for it to finish or choose another --out"
            ) from error
        yield


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Hold ``out/.write.lock`` while writing the folder's own files (run.json, the split
    lists, the report): launchers sharing a folder write them one at a time."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / WRITE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
