"""Many workers on one sweep, on a real PostgreSQL server started from this machine's own
installation (a private folder, a unix socket only, stopped at the end).

The demo runs with ``--workers 3``; one worker is killed with SIGKILL in the middle of a trial.
The sweep must still end with every rank, exactly ``--trials`` finished trials per rank, one
final model per rank, nothing left running, and the killed trial run again."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tests.conftest import run_driver, run_folder
from train_evaluate.report import main as report_main

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "train_evaluate" / "train_model.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the ``postgres`` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root and there is no runuser to start the server as 'postgres'")
    return [runuser, "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own; yields an Optuna storage URL (unix socket)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL installation (initdb, pg_ctl) on this machine")
    prefix = as_server_user()
    # not under pytest's folders, which only their owner may enter; short, for the socket path
    folder = Path(tempfile.mkdtemp(prefix="lora-compression-pg-"))
    if prefix:
        shutil.chown(folder, user="postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-k {folder} -c listen_addresses='' -p {port}"
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"),
         "-w", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={folder}&port={port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def studies(storage: optuna.storages.BaseStorage, prefix: str) -> dict[str, optuna.Study]:
    return {
        summary.study_name: optuna.load_study(study_name=summary.study_name, storage=storage)
        for summary in optuna.get_all_study_summaries(storage)
        if summary.study_name.startswith(prefix)
    }


def running_in_a_worker(storage, prefix: str, launcher: int) -> int | None:
    """The pid of a worker (not the launcher) that is training a trial now: one whose seed is
    recorded, so its slot and parameters are drawn (a kill while a trial draws them is a case
    of its own, not this test's)."""
    for study in studies(storage, prefix).values():
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = int(trial.user_attrs.get("worker", "x:0").rsplit(":", 1)[1])
            training = "seed" in trial.user_attrs
            if pid not in (0, launcher) and training and not study.study_name.endswith(":final"):
                return pid
    return None


def test_three_workers_share_the_sweep_and_a_killed_one_strands_nothing(
    postgres, tmp_path, demo_cache
):
    prefix, trials = "killed-", 5
    command = [
        sys.executable, str(DRIVER), "--init", "svd_init", "--ranks", "2", "4", "8",
        "--trials", str(trials), "--epochs", "10", "--threads", "1", "--workers", "3",
        "--storage", postgres, "--study-prefix", prefix, "--heartbeat", "1",
        "--results-dir", str(tmp_path / "results"), "--cache-dir", str(demo_cache),
        "--no-pruning",
    ]  # fmt: skip
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log_file:
        launcher = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    # one connection pool for the whole test: a new one per look would use up the server's
    storage = optuna.storages.RDBStorage(postgres)
    killed, deadline = None, time.monotonic() + 120
    while killed is None and launcher.poll() is None and time.monotonic() < deadline:
        pid = running_in_a_worker(storage, prefix, launcher.pid)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.05)
    try:
        launcher.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its workers
        launcher.wait()
        pytest.fail(f"the sweep did not end in 4 minutes:\n{log_path.read_text()[-3000:]}")
    output = log_path.read_text()
    assert killed is not None, f"no worker was seen running a trial:\n{output}"
    assert launcher.returncode == 0, output
    assert f"(pid {killed}) was killed (signal 9)" in output

    found = studies(storage, prefix)
    searches = {n: s for n, s in found.items() if ":" not in n}
    finals = {n: s for n, s in found.items() if n.endswith(":final")}
    assert len(searches) == len(finals) == 6  # sparse and int1 at 3 ranks
    retried = 0
    for study in [*searches.values(), *finals.values()]:
        states = Counter(t.state for t in study.trials)
        assert not states[optuna.trial.TrialState.RUNNING] + states[optuna.trial.TrialState.WAITING]
    for study in searches.values():
        finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
        assert len(finished) == trials
        retried += sum("failed_trial" in t.system_attrs for t in finished)
    for study in finals.values():
        (complete,) = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert complete.user_attrs["record"]["rank"] in (2, 4, 8)  # the record, in the storage
    # the killed worker's trial was failed by the heartbeat and run again, once
    killed_trials = [
        t for s in searches.values() for t in s.trials
        if t.user_attrs.get("worker", "").endswith(f":{killed}") and t.state.name == "FAIL"
        and "surplus" not in t.user_attrs
    ]  # fmt: skip
    assert len(killed_trials) == 1 and retried == 1
    # run again at its slot, with its seed and parameters; every slot finished once
    (dead,) = killed_trials
    (home,) = [s for s in searches.values() if dead.number < len(s.trials)
               and s.trials[dead.number].user_attrs.get("worker") == dead.user_attrs["worker"]
               and s.trials[dead.number].state.name == "FAIL"
               and "surplus" not in s.trials[dead.number].user_attrs]  # fmt: skip
    (retry,) = [t for t in home.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.user_attrs["slot"] == dead.user_attrs["slot"] and retry.params == dead.params
    assert retry.user_attrs["seed"] == dead.user_attrs["seed"]
    for study in searches.values():
        finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
        assert sorted(t.user_attrs["slot"] for t in finished) == list(range(trials))
        # one seed per slot: the retry took its slot's, not a later one's
        assert len({t.user_attrs["seed"] for t in finished}) == trials

    out = run_folder(tmp_path / "results", "svd_init")
    frame = pd.read_csv(out / "evaluation.csv")
    ranks = frame[~frame["lora_rank"].isin(["original", "quantized"])]
    assert sorted(zip(ranks["quant"], ranks["lora_rank"].astype(int), strict=True)) == sorted(
        (m, r) for m in ("sparse", "int1") for r in (2, 4, 8)
    )
    assert ranks["evaluation"].notna().all()
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["storage"].startswith("postgresql+psycopg://postgres@")
    # the report again, from the storage alone
    rebuilt = tmp_path / "rebuilt"
    arguments = ["--storage", postgres, "--out", str(rebuilt), "--study-prefix", prefix]
    assert report_main(arguments) == 0
    assert (rebuilt / "evaluation.csv").read_text() == (out / "evaluation.csv").read_text()
    assert (rebuilt / "accuracy_vs_rank.png").is_file()
    storage.engine.dispose()


@pytest.mark.parametrize(
    "change,fragment",
    [
        ("database", 'database "no_such_db" does not exist'),
        ("user", 'role "nobody" does not exist'),
    ],
)
def test_a_storage_that_cannot_be_opened_stops_in_one_line(postgres, change, fragment, tmp_path,
                                                           capsys):  # fmt: skip
    url = (
        postgres.replace("@/postgres?", "@/no_such_db?")
        if change == "database"
        else postgres.replace("postgres@", "nobody@")
    )
    code, _, err = run_driver(capsys, "--storage", url, "--results-dir", tmp_path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err
    assert not any(tmp_path.iterdir())  # before any work


def test_an_unreachable_server_stops_in_one_line(tmp_path, capsys):
    url = f"postgresql+psycopg://postgres@/postgres?host={tmp_path}&port={free_port()}"
    code, _, err = run_driver(capsys, "--storage", url, "--results-dir", tmp_path / "results")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot open --storage" in err


def test_a_trial_asked_after_the_last_slot_went_to_another_worker_is_surplus(tmp_path):
    from train_evaluate.search.workers import run_shared_study

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    others = []

    def sampler_for(taken: int) -> optuna.samplers.BaseSampler:
        if taken == 1 and not others:  # another worker takes the last slot meanwhile
            others.append(study.ask())
        return optuna.samplers.RandomSampler(seed=taken)

    ran = []

    def objective(trial: optuna.Trial, slot: int) -> float:
        ran.append(slot)
        return trial.suggest_float("x", 0, 1)

    ready = run_shared_study(study, objective, 2, sampler_for, lambda: None)
    assert ran == [0] and not ready  # the other worker's trial is still running
    states = [(t.state.name, "surplus" in t.user_attrs) for t in study.trials]
    assert states == [("COMPLETE", False), ("RUNNING", False), ("FAIL", True)]


def test_a_rank_final_is_claimed_once_and_again_after_its_holder_failed(tmp_path):
    from train_evaluate.search.workers import FinalClaim

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    first, second = FinalClaim(storage, "rank", 1), FinalClaim(storage, "rank", 1)
    assert first.acquire() and not second.acquire()
    first.release(False)  # its holder failed before writing the rank's files
    assert second.acquire()
    second.release(True)
    assert second.done() and not FinalClaim(storage, "rank", 1).acquire()


def test_of_two_workers_claiming_a_final_at_the_same_moment_one_gets_it(tmp_path):
    from train_evaluate.search.workers import FinalClaim

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    first, second = FinalClaim(storage, "rank", 1), FinalClaim(storage, "rank", 1)
    ask = second.study.ask

    def ask_after_the_other(*args, **kwargs):
        # both looked and saw no claim; the first asks just before the second does
        assert first.acquire()
        return ask(*args, **kwargs)

    second.study.ask = ask_after_the_other
    assert not second.acquire()
    assert [t.state.name for t in first.study.trials] == ["RUNNING", "FAIL"]
    first.release(True)


def test_a_report_is_asked_of_a_storage_that_holds_none(postgres, tmp_path, capsys):
    # an Optuna storage (its tables made, as a sweep's first open does) with no report in it;
    # report.py refuses a database without Optuna's tables before this check
    optuna.storages.RDBStorage(postgres).engine.dispose()
    code = report_main(["--storage", postgres, "--out", str(tmp_path), "--study-prefix", "none-"])
    err = capsys.readouterr().err
    assert code == 2 and "no finished sweep" in err and len(err.strip().splitlines()) == 1


def test_two_launchers_share_one_folder_and_one_storage(tmp_path, own_demo_cache):
    """Two machines over a shared filesystem, here two processes: the same command, the same
    --out and --storage; both end cleanly, and every rank is done once."""
    out, url = tmp_path / "run", f"sqlite:///{tmp_path / 'studies.db'}"
    command = [
        sys.executable, str(DRIVER), "--init", "svd_init", "--ranks", "2", "4", "--trials", "3",
        "--epochs", "5", "--threads", "1", "--storage", url, "--out", str(out),
        "--cache-dir", str(own_demo_cache),
    ]  # fmt: skip
    # the caches are built (the session's copy): the second starts while the first sweeps
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, output + second.stdout + second.stderr
    # the claims are asked outside Study.optimize, on purpose: no warning about it
    warning = "Heartbeat of storage is supposed to be used with Study.optimize"
    assert warning not in output + second.stdout + second.stderr
    frame = pd.read_csv(out / "evaluation.csv")
    assert len(frame[~frame["lora_rank"].isin(["original", "quantized"])]) == 4
    storage = optuna.storages.RDBStorage(url)
    for name, study in studies(storage, "").items():
        states = Counter(t.state.name for t in study.trials)
        if name.endswith(":final"):
            assert states["COMPLETE"] == 1
        elif ":" not in name:
            assert states["COMPLETE"] + states["PRUNED"] == 3 and not states["RUNNING"]
    storage.engine.dispose()


def test_a_whole_rank_is_one_workers_and_its_study_is_the_one_process_study(tmp_path, monkeypatch):
    """``--share ranks``: a rank another worker holds is left alone (no trial asked), and a
    rank this worker takes records the study, values and final model a one-process run does."""
    from compression import make_config
    from train_evaluate.search import sweep, workers
    from train_evaluate.search.storage import open_storage, shared_storage
    from train_evaluate.training import fc_method
    from train_evaluate.training.synthetic import synthetic_features

    head, splits = synthetic_features(600, 300)
    config = sweep.SweepConfig(init="svd_init", trials=7, epochs=3)  # past TPE's 5 random
    method = fc_method.Method.create("sparse", make_config("sparse"), head, splits.train.features)
    alone = sweep.run_rank(method, 4, splits, config, open_storage(tmp_path / "1.db"), "s")

    storage = shared_storage(f"sqlite:///{tmp_path / 'shared.db'}", 1)
    sharing = sweep.Sharing(storage, 1, whole_ranks=True)
    holder = workers.FinalClaim(storage, "s", 1)
    assert holder.acquire()  # another worker has the rank
    assert sweep.run_rank(method, 4, splits, config, storage, "s", sharing=sharing) is None
    assert optuna.load_study(study_name="s", storage=storage).trials == []
    holder.release(False)  # and let it go: the rank is free again
    outcome = sweep.run_rank(method, 4, splits, config, storage, "s", sharing=sharing)
    assert outcome.claim is not None and outcome.claim.trial is not None  # held until written
    outcome.claim.release(True)

    def trials(study):
        return [
            (t.params, t.state, t.value, t.intermediate_values) for t in workers.live(study.trials)
        ]

    assert len(alone.study.trials) == 7 and trials(outcome.study) == trials(alone.study)
    ran = workers.live(outcome.study.trials)
    assert {t.user_attrs["worker"] for t in ran} == {workers.worker_label()}
    assert outcome.record["finals"][0]["history"] == alone.record["finals"][0]["history"]
    assert outcome.record["test_acc"] == alone.record["test_acc"]

    # a rank whose last trial still runs elsewhere (a dead worker's, not yet stale): left for
    # later, its claim let go again, nothing trained
    one = sweep.SweepConfig(init="svd_init", trials=1, epochs=3)
    elsewhere = workers.open_study(storage, "t", direction="maximize").ask()
    scored = []
    evaluate = sweep.evaluate
    monkeypatch.setattr(sweep, "evaluate", lambda *a: scored.append(1) or evaluate(*a))
    assert sweep.run_rank(method, 4, splits, one, storage, "t", sharing=sharing) is None
    assert scored == []  # not even the init scored
    claims = optuna.load_study(study_name="t:final", storage=storage).trials
    assert [t.state.name for t in claims] == ["FAIL"]
    assert [t.number for t in optuna.load_study(study_name="t", storage=storage).trials] == [
        elsewhere.number
    ]
    storage.engine.dispose()


@pytest.mark.parametrize("share", ["trials", "ranks"])
def test_whole_ranks_are_taken_largest_first(share, monkeypatch):
    from types import SimpleNamespace

    from train_evaluate.search import records
    from train_evaluate.search.sweep_all import share_ranks

    seen = []

    def record_of(context, method, rank):
        seen.append((method.name, rank))
        return {"rank": rank}

    methods = [SimpleNamespace(name="sparse"), SimpleNamespace(name="int1")]
    context = SimpleNamespace(sharing=SimpleNamespace(whole_ranks=share == "ranks"))
    monkeypatch.setattr(records, "rank_record", record_of)
    found = share_ranks(context, methods, (2, 8, 4))
    assert found == {name: [{"rank": 2}, {"rank": 8}, {"rank": 4}] for name in ("sparse", "int1")}
    if share == "ranks":
        assert seen == [("sparse", 8), ("int1", 8), ("sparse", 4), ("int1", 4),
                        ("sparse", 2), ("int1", 2)]  # fmt: skip
    else:
        assert seen == [(m, r) for m in ("sparse", "int1") for r in (2, 8, 4)]


def test_local_workers_divide_the_cores_and_pass_their_share_on():
    from train_evaluate.config.cli import available_cores
    from train_evaluate.config.options import parse_args
    from train_evaluate.config.plan import plan_run
    from train_evaluate.train_model import worker_argv

    argv = ["--epochs", "0", "--ranks", "2", "--workers", "2", "--share", "ranks"]
    plan = plan_run(parse_args(argv), argv)
    # the launcher builds the caches on every core, then sweeps on its share, as the workers
    assert plan.threads == available_cores() and plan.share == "ranks"
    assert plan.worker_threads == max(1, available_cores() // 2)
    passed = worker_argv(plan)
    assert passed[-4:] == ["--threads", str(plan.worker_threads), "--workers", "1"]
    assert "--share" in passed
    given = [*argv, "--thread", "3"]  # an abbreviation, too
    assert plan_run(parse_args(given), given).worker_threads == 3


# One worker on one rank, --share ranks (the rank's claim, then its trials, then its finals),
# on a synthetic problem where the median pruner prunes; prints the rank's record as JSON.
WHOLE_RANK_WORKER = """
import json, sys, time
import torch
torch.set_num_threads(1)
from compression import make_config
from train_evaluate.search import sweep
from train_evaluate.training import fc_method
from train_evaluate.search.storage import shared_storage
from train_evaluate.training.synthetic import synthetic_features

head, splits = synthetic_features(1500, 300, classes=10)
config = sweep.SweepConfig(init="svd_init", trials=6, epochs=12)
method = fc_method.Method.create("sparse", make_config("sparse"), head, splits.train.features)
storage = shared_storage(sys.argv[1], 1)
sharing = sweep.Sharing(storage, 1, whole_ranks=True)
# None while a dead holder's claim has not yet gone stale
while (outcome := sweep.run_rank(method, 4, splits, config, storage, "s", sharing=sharing)) is None:
    time.sleep(0.1)
outcome.claim.release(True)
record = {k: v for k, v in outcome.record.items() if k != "seconds"}
print("RECORD " + json.dumps(record, default=str))
"""


def whole_rank_worker(script: Path, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def record_of(process: subprocess.Popen) -> dict:
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "Heartbeat of storage is supposed to be used with Study.optimize" not in output
    (line,) = [line for line in output.splitlines() if line.startswith("RECORD ")]
    return json.loads(line.removeprefix("RECORD "))


def test_a_whole_rank_resumed_after_its_worker_was_killed_is_the_uninterrupted_one(tmp_path):
    """--share ranks: a worker SIGKILLed in the middle of a trial whose pruning depends on the
    trials before it; the worker that takes the rank over records the study (trials in the order
    they ran: parameters, states, values, reports) and the rank's record of an uninterrupted
    run, computed here with the same threads."""
    from train_evaluate.search import workers
    from train_evaluate.search.storage import shared_storage

    script = tmp_path / "worker.py"
    script.write_text(WHOLE_RANK_WORKER)
    alone_url, url = f"sqlite:///{tmp_path / 'alone.db'}", f"sqlite:///{tmp_path / 'killed.db'}"
    alone = whole_rank_worker(script, alone_url)
    first = whole_rank_worker(script, url)
    storage = shared_storage(url, 1)
    killed, deadline = None, time.monotonic() + 90
    while killed is None and first.poll() is None and time.monotonic() < deadline:
        try:
            running = optuna.load_study(study_name="s", storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            )
        except KeyError:  # not created yet
            running = []
        for trial in running:
            # slot 3 or later: the pruner judges them against the 3 or more finished trials
            # before them (any of them will do: a short trial can be missed between looks)
            if trial.user_attrs.get(workers.SLOT, 0) >= 3 and trial.intermediate_values:
                first.kill()
                killed = trial
        time.sleep(0.01)
    first.communicate()
    assert killed is not None, "the worker was not seen in the middle of a slot from 3 on"
    record = record_of(alone)
    # A killed trial's last beat can come after its claim's or before it; take the harder
    # order: the claim goes stale and is taken over while the dead trial still looks alive
    # (its heartbeat kept up here until the new worker holds the claim).
    second, deadline = whole_rank_worker(script, url), time.monotonic() + 60
    claims = optuna.load_study(study_name="s:final", storage=storage)
    while second.poll() is None and time.monotonic() < deadline:
        storage.record_heartbeat(killed._trial_id)
        holders = [t.user_attrs.get("worker", "") for t in claims.get_trials(deepcopy=False)
                   if t.state == optuna.trial.TrialState.RUNNING]  # fmt: skip
        if any(label.endswith(f":{second.pid}") for label in holders):
            break
        time.sleep(0.2)
    resumed = record_of(second)

    def ran(study_url: str) -> list:
        study = optuna.load_study(study_name="s", storage=study_url)
        return [
            (t.params, t.state, t.value, t.intermediate_values, t.user_attrs["seed"])
            for t in workers.live(study.trials)
        ]

    again = optuna.load_study(study_name="s", storage=url).trials
    assert again[killed.number].state == optuna.trial.TrialState.FAIL
    assert ran(url) == ran(alone_url)
    assert any(state == optuna.trial.TrialState.PRUNED for _, state, *_ in ran(url))
    # the best trial's number counts the failed trial too; everything else is the same
    assert resumed.pop("best_trial")["val_acc"] == record.pop("best_trial")["val_acc"]
    assert resumed == record
    storage.engine.dispose()


RETRIED_WORKER = """
import os, signal, sys
import optuna
from train_evaluate.search.workers import run_shared_study

storage = optuna.storages.RDBStorage(sys.argv[1], heartbeat_interval=1, grace_period=1)
study = optuna.load_study(study_name="s", storage=storage)

def objective(trial, slot):
    x = trial.suggest_float("x", 0, 1)
    if slot == 1:
        trial.report(x, 0)
        os.kill(os.getpid(), signal.SIGKILL)  # dies in the middle of its second trial
    return x

run_shared_study(study, objective, 4, lambda i: optuna.samplers.RandomSampler(seed=i), print)
"""


def test_a_retried_trial_runs_at_its_originals_slot_after_later_trials(tmp_path):
    """A worker killed in slot 1; another asks slots 2 and 3 before the dead trial is stale,
    then runs its retry: at slot 1 (its seed), with its parameters; slots 0..3 once each."""
    from train_evaluate.search.workers import SLOT, run_shared_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = optuna.storages.RDBStorage(
        url,
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(3),
    )
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    script = tmp_path / "worker.py"
    script.write_text(RETRIED_WORKER)
    died = subprocess.run([sys.executable, str(script), url], cwd=REPO, capture_output=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    (dead,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    storage.record_heartbeat(dead._trial_id)  # it looks alive for one more second

    ran = []

    def objective(trial: optuna.Trial, slot: int) -> float:
        ran.append((slot, trial.suggest_float("x", 0, 1)))
        return ran[-1][1]

    def sampler_for(slot: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=slot)

    assert not run_shared_study(study, objective, 4, sampler_for, lambda: None)
    assert [slot for slot, _ in ran] == [2, 3]  # the dead trial is not stale yet
    deadline = time.monotonic() + 10  # SQLite's clock counts whole seconds
    while not run_shared_study(study, objective, 4, sampler_for, lambda: None):
        assert time.monotonic() < deadline, "the dead trial never went stale"
        time.sleep(0.2)
    assert ran[2] == (1, dead.params["x"])  # its slot and its parameters
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs[SLOT] for t in finished) == [0, 1, 2, 3]
    # a fresh slot's parameters come from its slot's sampler seed
    for slot, x in ran[:2]:
        assert x == optuna.samplers.RandomSampler(seed=slot).sample_independent(
            study, None, "x", optuna.distributions.FloatDistribution(0, 1)
        )
    storage.engine.dispose()
