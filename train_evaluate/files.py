"""Writing result files so that a crash never leaves a half-written one behind.

Every writer goes through ``atomic_path``: the content is written to a temporary file in the
same folder and renamed over the target, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# mkstemp creates files readable by their owner only; results are shared like any other file.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}"
    )
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as path:
        path.write_text(text)


def write_json(target: Path, value: Any) -> None:
    write_text(target, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None if it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def check_writable(folder: Path) -> str | None:
    """None if ``folder`` (or the nearest existing parent) can be written; else the reason."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
