"""Optuna storages: one run's SQLite file, a shared storage for many workers, their checks, and
the finished sweeps' reports kept in a storage.

Both the one-process sweep (``sweep``) and many workers (``workers``) open their studies here,
so neither imports the other for it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from train_evaluate.runtime.urls import shown


def open_storage(path: Path) -> optuna.storages.RDBStorage:
    """The run's Optuna studies, in one SQLite file (openable with optuna-dashboard).

    Write-ahead logging with synchronous=NORMAL: a trial reports every epoch, and this makes
    each write about a third cheaper (measured: 100 -> 63 ms per 11-report trial). A killed
    process loses nothing committed; only a power cut could lose the last commits.
    """
    return with_wal(optuna.storages.RDBStorage(f"sqlite:///{Path(path).resolve()}"))


def with_wal(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """``storage`` (SQLite) with write-ahead logging and synchronous=NORMAL on every
    connection: cheaper writes, and readers that do not wait for a writer (many workers)."""

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened before the listener reconnect with it
    return storage


GRACE_BEATS = 3  # heartbeats a trial may miss before it counts as dead


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
        storage = with_wal(storage)
    return storage


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


def optuna_tables() -> set[str]:
    """The tables an Optuna storage of this Optuna version holds (``RDBStorage`` creates any
    that are missing when it opens, so all of them must already be there for a read-only
    open); the three every version has, if Optuna's private models module moves."""
    try:
        from optuna.storages._rdb import models

        return set(models.BaseModel.metadata.tables)
    except (ImportError, AttributeError):
        return {"studies", "trials", "version_info"}


def check_existing_storage(url: str) -> str | None:
    """None if ``url`` is an existing Optuna storage, else one line saying why not; nothing is
    written either way. ``search.storage.check_storage`` opens an ``RDBStorage``, which creates
    the database and its tables when they are missing: right for the driver, which is about to
    write there, but a report must leave a wrong URL (a new file, an empty one, another
    database) as it found it."""
    import sqlite3

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as error:
        return f"--storage {shown(url)} is not a database URL ({error})"
    wanted = optuna_tables()
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return f"--storage {shown(url)} names no database file; pass the sweep's sqlite:///FILE"
        path = Path(database)
        if not path.exists():
            return f"--storage {path} does not exist; pass the file the sweep's workers wrote"
        if not path.is_file():
            return f"--storage {path} is not a file; pass the SQLite file the sweep wrote"
        if path.stat().st_size == 0:
            return f"--storage {path} is an empty file, not an Optuna storage"
        try:
            # mode=ro: SQLite itself refuses any write through this connection
            with contextlib.closing(
                sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            ) as connection:
                rows = connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
                found = {name for (name,) in rows}
        except sqlite3.Error as error:
            return f"--storage {path} cannot be read as an SQLite database ({error})"
    else:
        kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
        engine = None
        try:
            engine = sqlalchemy.create_engine(url, **kwargs)
            found = set(sqlalchemy.inspect(engine).get_table_names())
        except Exception as error:  # sqlalchemy, the driver, the server: reported in one line
            reason = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
            return f"cannot open --storage {shown(url)}: {reason}"
        finally:
            if engine is not None:
                engine.dispose()
    missing = sorted(wanted - found)
    if missing:
        return (
            f"--storage {shown(url)} is not an Optuna storage of this version (it lacks the "
            f"tables {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); pass the "
            "storage the sweep used"
        )
    return None
