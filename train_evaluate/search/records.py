"""Per-rank records: what a finished (method, rank) produced, and resuming from them.

A rank's record (``records/<method>_r<rank>.json``) is written last, after its files, and holds
the SHA-256 of each of those files and of its own content. A later run reuses a finished rank
only when the record's key matches this run's settings and the record and every file it lists
verify; otherwise the rank is run again (its Optuna trials are in the study, so only the final
models are retrained, to the same numbers).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from torch import nn

from compression import uses_inputs
from train_evaluate.inputs.features import feature_key
from train_evaluate.outputs import report
from train_evaluate.outputs.checkpoint import CheckpointError
from train_evaluate.outputs.network_checkpoint import verify_packed
from train_evaluate.runtime.files import read_json, write_json
from train_evaluate.runtime.progress import Progress
from train_evaluate.search.sweep import Sharing, Splits, run_rank, steps_per_rank
from train_evaluate.training.target import Target
from train_evaluate.training.training import evaluate

if TYPE_CHECKING:  # the plan is built by config/, which imports this group
    from train_evaluate.config.plan import Plan

log = logging.getLogger(__name__)

# Raised when a record gains fields: older records are then recomputed, not reused half-empty.
RECORD_FORMAT = 3


@dataclass
class RunContext:
    """What every rank of a run shares once the features are in."""

    plan: Plan
    head: nn.Linear
    splits: Splits
    original_acc: float
    features_key: str
    weights_id: str
    test_ids_sha256: str
    storage: optuna.storages.BaseStorage
    progress: Progress
    sharing: Sharing | None = None  # many workers on one storage


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def content_digest(record: dict[str, Any]) -> str:
    """SHA-256 of a record's JSON without its own digest field."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def record_path(out: Path, method: str, rank: int) -> Path:
    return out / "records" / f"{method}_r{rank}.json"


def record_problem(out: Path, record: dict[str, Any]) -> str | None:
    """None if the record and every file it lists are intact; else what is wrong."""
    if record.get("record_sha256") != content_digest(record):
        return "its record does not match its digest"
    for name, expected in sorted(record.get("files", {}).items()):
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != expected:
            return f"{name} was changed or damaged"
    checkpoint = record.get("files", {}).keys() & {
        str(report.checkpoint_path(Path(), record["method"], record["rank"]))
    }
    for name in checkpoint:
        try:
            verify_packed(out / name)
        except CheckpointError as error:
            return str(error)
    return None


def identities(context: RunContext, method: Target, rank: int) -> tuple[str, str]:
    """(Optuna study name, record key) of one rank.

    The study depends on everything but the trial count (a study can be extended) and the
    number of final models; the record depends on those too, and on the adapter's stored dtype.
    """
    plan = context.plan
    sweep = asdict(plan.sweep)
    identity = {
        "features": context.features_key,
        "split": asdict(plan.fractions),
        "compression": method.config.describe(),
        "sweep": {k: v for k, v in sweep.items() if k not in ("trials", "final_seeds")},
        # Training runs on another device draw other random numbers (paper_init's A) and sum in
        # another order: a study is not continued across devices.
        "device": plan.device.type,
    }
    if uses_inputs(method.config):
        # calibrated compressors read the layer's inputs (the mse scale did not, before): a
        # study or record made on the weights alone is not theirs
        identity["compressor_inputs"] = "input second moment"
    if plan.fit != type(plan.fit)():  # the act-aware fits' ridge and strength, where not default
        identity["fit"] = asdict(plan.fit)
    study_name = f"{plan.study_prefix}{method.name}_r{rank}_{feature_key(**identity)[:12]}"
    dtypes = set(method.layer_plan(rank, plan.adapter_dtype).adapter_dtypes().items())
    key = feature_key(
        record_format=RECORD_FORMAT,
        study=study_name,
        trials=plan.sweep.trials,
        finals=plan.sweep.final_seeds,
        # the run's, or each layer's where a plan stores some adapters otherwise
        adapter_dtype=plan.adapter_dtype
        if {dtype for _, dtype in dtypes} == {plan.adapter_dtype}
        else sorted(dtypes),
    )
    return study_name, key


def checkpoint_info(context: RunContext) -> dict[str, Any]:
    """What the packed checkpoint says about where it comes from. No absolute paths: the same
    run in another folder writes a file of the same size (the paths are in run.json)."""
    plan = context.plan
    info = {
        "model": plan.model,
        "weights": context.weights_id,
        "demo": plan.demo,
        "data": plan.data_name,
        "feature_key": context.features_key,
        "test_ids_sha256": context.test_ids_sha256,
    }
    folded = plan.network.folded if plan.network is not None else ()
    if folded:  # the BatchNorms that loading takes out of the backbone: the file's layers hold them
        info["folded_batchnorm"] = dict(folded)
    return info


def rank_record(context: RunContext, method: Target, rank: int) -> dict[str, Any] | None:
    """A rank's record: reused when a finished, intact one with the same key exists, else
    computed (with its files) and written. Many workers (``context.sharing``): None when this
    worker has nothing (more) to do on the rank now; the worker that claimed its finals writes
    its files and record, and releases the claim only then."""
    plan = context.plan
    study_name, key = identities(context, method, rank)
    path = record_path(plan.out, method.name, rank)
    record = read_json(path)
    if record is not None and record.get("key") == key:
        problem = record_problem(plan.out, record)
        if problem is None:
            log.info(
                "%s r=%d: finished already (an earlier run, or another worker); reusing its "
                "results",
                method.name,
                rank,
            )
            context.progress.advance(steps_per_rank(plan.sweep), f"{method.name} r={rank} reused")
            return record
        log.warning("%s r=%d: %s; running the rank again", method.name, rank, problem)
    context.progress.label = f"{method.name} r={rank}"
    outcome = run_rank(
        method, rank, context.splits, plan.sweep, context.storage, study_name,
        context.progress.step, plan.adapter_dtype, context.sharing,
    )  # fmt: skip
    if outcome is None:
        return None
    try:
        record = write_record(context, outcome, key, path, method)
    except BaseException:
        if outcome.claim is not None:
            outcome.claim.release(False)
        raise
    if outcome.claim is not None:
        outcome.claim.release(True)
    return record


def write_record(
    context: RunContext, outcome: Any, key: str, path: Path, built: Target
) -> dict[str, Any]:
    """The rank's files (curves, pages, its plan, checkpoint, read back and scored) and, last,
    its record. ``built``: the method (FC or whole network) the rank was trained with."""
    plan = context.plan
    method, rank = outcome.record["method"], outcome.record["rank"]
    record = {**outcome.record, "key": key}
    layer_plan = built.layer_plan(rank, plan.adapter_dtype)
    info = {**checkpoint_info(context), "layer_plan": layer_plan.to_json(built.descriptions())}
    layers = None if outcome.layer is None else built.adapters_of(outcome.layer)
    checkpoint = report.write_rank_artifacts(
        plan.out, record, layers, outcome.study, layer_plan.adapter_dtypes(), info
    )
    if checkpoint is not None:
        # Read the file back and score the model it holds: the number a user of the file gets.
        rebuilt = built.load(checkpoint, plan.device)
        test = context.splits.test.with_base(rebuilt)
        record["file"] = {
            "bytes": checkpoint.stat().st_size,
            "test_acc": evaluate(rebuilt, test)["acc"],
        }
    record["files"] = {
        str(p.relative_to(plan.out)): file_digest(p)
        for p in report.rank_artifacts(plan.out, method, rank)
        if p.is_file()
    }
    record["record_sha256"] = content_digest(record)
    write_json(path, record)  # last: a record on disk means the rank's files are complete
    if outcome.claim is not None and outcome.claim.trial is not None:
        # many workers: the record in the storage as well, on the rank's final claim
        outcome.claim.trial.set_user_attr("record", record)
    summary = "no final model" if record["test_acc"] is None else f"test {record['test_acc']:.2f}%"
    log.info(
        "%s r=%d: %s (init only %.2f%%) in %.1f s",
        method,
        rank,
        summary,
        record["init_only"]["test_acc"],
        record["seconds"],
    )
    return record
