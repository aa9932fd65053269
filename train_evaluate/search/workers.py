"""Many workers on one sweep: Optuna's RDB storage is the scheduler.

Several processes (``--workers N`` on one machine, or the same command on several machines with
the same ``--storage``) run the same sweep. Each walks the (method, rank) list and works where
there is work: nothing else coordinates them than the studies in the storage.

- **Trials.** Each rank still gets exactly ``--trials`` trials. A worker asks a trial and counts
  the trials of the study before it that are not failed (a retried trial at its original's
  place, see below): that count is the trial's *slot*. A
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
  slot). The one-process rule "mark every running trial failed at start" is not used: it would
  fail a live worker's trial.
- **Slots of retried trials.** A trial's slot is fixed when it is asked (the user attribute
  ``slot``) by counting the trials asked before it that still hold a slot, each *retry chain*
  (an original trial and its retries, which Optuna links through the system attribute
  ``failed_trial``) counted once, at its original's place. A retry inherits its original's user
  attributes, so it runs at its original's slot, with its seed and the parameters its original
  had drawn (one killed before it drew them all draws the rest from its slot's sampler); trials
  asked meanwhile keep theirs.
- **What a resumed sweep promises.** ``--share ranks``: the worker that takes a rank's claim
  over from a dead holder fails the trials that holder left running, at once and without a
  retry (``take_over``), and asks their slots again as a one-process resume does
  (``study.fail_interrupted``): each slot's trial is drawn from its slot's sampler seed on the
  same finished trials, trained with its slot's seed and pruned against the same finished
  trials, so on a CPU with the same threads the resumed study's finished trials (parameters,
  states, values, reports) and the rank's record are those of an uninterrupted run; only the
  failed trials and the trial numbers differ. ``--share trials``: every rank still ends with
  exactly ``--trials`` finished trials, one per slot, and a killed trial is run again once at
  its slot, with its seed and the parameters it had drawn (all of them, unless it was killed
  while drawing), so it trains the same model; but it runs after
  trials asked later, and the median pruner judges each epoch against the trials finished by
  then, so whether it (or a later trial) is pruned, and TPE's later draws, may differ from an
  uninterrupted run. Not covered in either mode: a worker killed between asking a trial and
  recording its slot (its retry is drawn again, from its slot's seed), a retry chain that Optuna
  stops retrying (after 3 retries: its slot is lost and later slots can repeat one), and, in
  ``--share trials``, a trial asked in the moment between a dead trial's failure and its retry.
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

from train_evaluate.search.storage import open_study

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often an idle worker looks again for work


class Surplus(Exception):
    """A trial asked after the study already had all its trials."""


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


SLOT = "slot"  # user attribute: the slot a trial was asked for (a retry inherits it)
HEARTBEAT_OUTSIDE_OPTIMIZE = "Heartbeat of storage is supposed to be used with Study.optimize"


def live(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that hold a slot: every state but failed."""
    return [t for t in trials if t.state != TrialState.FAIL]


def original_of(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the trial that ``trial`` retries (Optuna's retry callback records it),
    or its own number."""
    return trial.system_attrs.get("failed_trial", trial.number)


def slot_of(study: optuna.Study, number: int) -> int:
    """The slot of trial ``number``: the one recorded when it (or the original it retries) was
    asked, else the number of retry chains begun before its original that still hold a slot
    (a chain holds one while any of its trials is not failed)."""
    trials = study.get_trials(deepcopy=False)
    trial = next(t for t in trials if t.number == number)
    if SLOT in trial.user_attrs:
        return trial.user_attrs[SLOT]
    first = original_of(trial)
    return len({original_of(t) for t in live(trials) if original_of(t) < first})


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
        trial.set_user_attr(SLOT, slot)
        if slot >= trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its {trials} trials")
        # parameters not yet set (a fresh trial, or a retry asked before it suggested any) are
        # drawn, at their first suggestion, by the sampler seeded for the trial's own slot
        study.sampler = sampler_for(slot)
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
        with warnings.catch_warnings():
            # the claim is asked outside Study.optimize on purpose: it beats its own heartbeat
            warnings.filterwarnings("ignore", message=HEARTBEAT_OUTSIDE_OPTIMIZE)
            trial = self.study.ask()
        trial.set_user_attr("worker", worker_label())
        if slot_of(self.study, trial.number) > 0:  # another worker asked first
            trial.set_user_attr("surplus", True)
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        self.trial = trial
        # the storage's id of the trial, through its public API (Optuna's Trial keeps it private)
        self._trial_id = self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(self.study.study_name), trial.number
        )
        self.storage.record_heartbeat(self._trial_id)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="final-heartbeat")
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.storage.record_heartbeat(self._trial_id)

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


def take_over(study: optuna.Study, claim: FinalClaim) -> list[int]:
    """Whole ranks: fail the trials of ``study`` that earlier holders of its rank's ``claim``
    (now held here) left running, and return their numbers. A rank's trials run only under
    its claim, so they are dead: their holder died (its claim went stale) or let the claim go
    after they had ended. They are failed without a retry, as a one-process resume fails its
    interrupted trials, so that their slots are asked again with the slot's sampler seed and
    against the same finished trials (see the module's notes). Running trials of a worker that
    never held the claim are left to their heartbeat."""
    assert claim.trial is not None, "take_over needs the rank's claim held"
    holders = {
        t.user_attrs.get("worker")
        for t in claim.study.get_trials(deepcopy=False)
        if t.number != claim.trial.number and "surplus" not in t.user_attrs
    } - {None}
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") in holders:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # finished meanwhile (failed by a heartbeat check elsewhere)
            failed.append(trial.number)
    return failed


def spawn(argv: list[str], count: int, out: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Start ``count`` worker processes running ``argv`` (the driver's own arguments) as
    workers, each logging to ``out/workers/<host>-worker-<i>.log``; on a machine with several GPUs,
    one each (``CUDA_VISIBLE_DEVICES``)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    folder = out / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve().parents[1] / "train_model.py"
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
