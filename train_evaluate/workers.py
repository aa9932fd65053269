"""Many workers on one sweep: Optuna's RDB storage is the scheduler.

Several processes (``--workers N`` on one machine, or the same command on several machines with
the same ``--storage``) run the same sweep. Each walks the (method, rank) list and works where
there is work: nothing else coordinates them than the studies in the storage.

- **Trials.** Each rank still gets exactly ``--trials`` trials. A worker asks a trial and counts
  the trials of the study before it that are not failed: that count is the trial's *slot*. A
  trial whose slot is ``--trials`` or more is surplus: it is marked failed at once (with the
  user attribute ``surplus``) and the worker moves on. Trial numbers come from the storage, so
  two workers never get the same slot; the slot seeds the trial as the index does in a
  one-process sweep, so one worker alone draws what today's sweep draws.
- **Finals.** A rank's final models are trained once, by the worker that claims the rank's
  one-trial study ``<study>:final`` first (the same slot rule with one slot). The claim stays
  open (a running trial with a heartbeat) until the rank's files and record are written.
- **Whole ranks** (``--share ranks``). A worker takes a rank's final claim before its first
  trial instead of after its last, so the rank's trials are its own too and the others pass the
  rank by: on a CPU with the same threads each study is then the one a single process records
  (on CUDA a single process batches its trials). Ranks are taken largest first.
- **Crashes.** With a shared storage every trial, the claims included, beats a heartbeat
  (``--heartbeat`` seconds); one that stops beating for three intervals is marked failed by the
  next worker that looks at the study, and Optuna's ``RetryHeartbeatStaleTrialCallback`` puts
  it back as a waiting trial with the same parameters, which the next ask hands out. A killed
  worker's trial is therefore run again, once, and never counted twice (the failed one holds no
  slot).
  The one-process rule "mark every running trial failed at start" is not used: it would fail a
  live worker's trial.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often an idle worker looks again for work
GRACE_BEATS = 3  # heartbeats a trial may miss before it counts as dead


class Surplus(Exception):
    """A trial asked after the study already had all its trials."""


def open_study(storage: Any, name: str, **options: Any) -> optuna.Study:
    """``optuna.create_study(load_if_exists=True)`` that survives another worker creating the
    same study at the same moment (the storage then refuses the second insert)."""
    for attempt in range(5):
        try:
            return optuna.create_study(
                storage=storage, study_name=name, load_if_exists=True, **options
            )
        except (optuna.exceptions.StorageInternalError, optuna.exceptions.DuplicatedStudyError):
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def live(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that hold a slot: every state but failed."""
    return [t for t in trials if t.state != TrialState.FAIL]


def slot_of(study: optuna.Study, number: int) -> int:
    """How many trials before trial ``number`` hold a slot."""
    return len([t for t in live(study.get_trials(deepcopy=False)) if t.number < number])


def fail_stale(study: optuna.Study) -> None:
    """Mark trials whose heartbeat stopped failed (and queue their retries); nothing for a
    storage without heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def has_work(study: optuna.Study, trials: int) -> bool:
    """Whether a worker may ask a trial now: a slot is free, or a dead worker's trial waits to
    be run again (a waiting trial keeps the slot of the one it replaces)."""
    current = study.get_trials(deepcopy=False)
    return len(live(current)) < trials or any(t.state == TrialState.WAITING for t in current)


def running_elsewhere(study: optuna.Study, trials: int) -> bool:
    """Whether the study's last trials are running in other workers: not all have finished,
    and no slot is free for this one (stale trials are failed first)."""
    fail_stale(study)
    return finished_count(study) < trials and not has_work(study, trials)


def finished_count(study: optuna.Study) -> int:
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def run_shared_study(
    study: optuna.Study,
    objective: Callable[[optuna.Trial, int], float],
    trials: int,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler],
    on_trial: Callable[[], None],
) -> bool:
    """Run this worker's share of the study's trials: while a slot is free, ask one and run it.
    Returns whether all ``trials`` have finished (the rank's final can be claimed)."""

    def claimed(trial: optuna.Trial) -> float:
        slot = slot_of(study, trial.number)
        trial.set_user_attr("worker", worker_label())
        if slot >= trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its {trials} trials")
        return objective(trial, slot)

    while True:
        fail_stale(study)
        if not has_work(study, trials):
            break
        taken = len(live(study.get_trials(deepcopy=False)))
        study.sampler = sampler_for(taken)
        study.optimize(claimed, n_trials=1, catch=(Surplus,))
        last = study.get_trials(deepcopy=False)[-1]
        if "surplus" not in last.user_attrs:
            on_trial()
    return finished_count(study) >= trials


class FinalClaim:
    """The right to train a rank's final models and write its files: the first live trial of
    the one-trial study ``<name>:final``; held, with a heartbeat, until ``release``."""

    def __init__(self, storage: Any, name: str, heartbeat: int) -> None:
        self.storage = storage
        self.heartbeat = heartbeat
        self.study = open_study(storage, f"{name}:final", direction="maximize")
        self.trial: optuna.Trial | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        return any(t.state == TrialState.COMPLETE for t in self.study.get_trials(deepcopy=False))

    def acquire(self) -> bool:
        """Whether this worker now holds the claim (False: another worker holds or held it)."""
        fail_stale(self.study)
        trials = self.study.get_trials(deepcopy=False)
        # a running claim is another worker's; a waiting one is a dead worker's, put back
        if self.done() or any(t.state == TrialState.RUNNING for t in trials):
            return False
        trial = self.study.ask()
        trial.set_user_attr("worker", worker_label())
        if slot_of(self.study, trial.number) > 0:  # another worker asked first
            trial.set_user_attr("surplus", True)
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        self.trial = trial
        self.storage.record_heartbeat(trial._trial_id)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="final-heartbeat")
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.storage.record_heartbeat(self.trial._trial_id)

    def release(self, done: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.trial is not None:
            if done:
                self.study.tell(self.trial, 1.0)
            else:
                self.study.tell(self.trial, state=TrialState.FAIL)
            self.trial = None


def shared_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    """``url`` with heartbeats, and failed trials put back once more (up to 3 times); an SQLite
    file in write-ahead-log mode, as the one-process sweep's."""
    storage = optuna.storages.RDBStorage(
        url,
        heartbeat_interval=heartbeat,
        grace_period=GRACE_BEATS * heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=3
        ),
    )
    if url.startswith("sqlite"):
        from train_evaluate.sweep import with_wal

        storage = with_wal(storage)
    return storage


def spawn(argv: list[str], count: int, out: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Start ``count`` worker processes running ``argv`` (the driver's own arguments) as
    workers, each logging to ``out/workers/<host>-worker-<i>.log``; on a machine with several GPUs,
    one each (``CUDA_VISIBLE_DEVICES``)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    folder = out / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve().parent / "train_model.py"
    started = []
    for index in range(count):
        environment = dict(os.environ)
        if gpus > 1:
            environment["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        # named by host too: launchers on several machines may share the folder
        log_path = folder / f"{socket.gethostname()}-worker-{index + 1}.log"
        with open(log_path, "w") as handle:
            process = subprocess.Popen(
                [sys.executable, str(script), *argv, "--worker-of", str(os.getpid())],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        log.info("worker %d: pid %d, log %s", index + 1, process.pid, log_path)
        started.append((process, log_path))
    return started


def wait(started: list[tuple[subprocess.Popen, Path]]) -> list[str]:
    """Wait for every worker; returns a line for each that did not end cleanly."""
    problems = []
    for index, (process, log_path) in enumerate(started, 1):
        code = process.wait()
        if code != 0:
            how = f"was killed (signal {-code})" if code < 0 else f"exited with {code}"
            problems.append(f"worker {index} (pid {process.pid}) {how}; see {log_path}")
    return problems


def idle() -> None:
    time.sleep(POLL_SECONDS)


def shown(url: str) -> str:
    """``url`` with its password hidden, for messages and run.json."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: say so without repeating it
        return "(an unreadable URL)"


def check_storage(url: str) -> str | None:
    """None if an Optuna storage opens at ``url`` (its tables are made if new); else one line
    saying why not (the server's own reason: unreachable, no such database or user, bad
    password, unknown driver)."""
    kwargs = {}
    if url.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}}
    storage = None
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        storage.get_all_studies()
    except Exception as error:  # sqlalchemy, the driver, or a malformed URL
        reason = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
        return f"cannot open --storage {shown(url)}: {reason}"
    finally:
        if storage is not None:
            storage.engine.dispose()
    return None


RUN_STUDY = "run:"  # after the study prefix: one study per run configuration, holding its report


def store_report(
    storage: Any,
    prefix: str,
    config: dict[str, Any],
    frame: Any,
    title: str,
    layers: str | None,
) -> str:
    """Put a finished sweep's ``evaluation.csv`` rows (and ``layers.csv``, whole network) in
    the study ``<prefix>run:<digest of the configuration>``; returns its name."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    study = open_study(storage, f"{prefix}{RUN_STUDY}{digest}", direction="maximize")
    study.set_user_attr("config", config)
    study.set_user_attr("title", title)
    rows = frame.to_json(orient="records", double_precision=15)
    study.set_user_attr("evaluation", json.loads(rows))
    if layers is not None:
        study.set_user_attr("layers_csv", layers)
    return study.study_name


def stored_reports(storage: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """The reports ``store_report`` left under ``prefix``: study name -> its attributes."""
    found = {}
    for summary in optuna.get_all_study_summaries(storage):
        if summary.study_name.startswith(f"{prefix}{RUN_STUDY}"):
            attrs = summary.user_attrs
            if "evaluation" in attrs:
                found[summary.study_name] = attrs
    return found
