"""Writing result files so that a crash never leaves a half-written one behind, and checking
what is read back.

Every writer goes through ``atomic_path``: the content is written to a temporary file in the
same folder and renamed over the target, which POSIX makes atomic. The temporary's name carries
its writer's host and PID, so the temporaries of killed runs can be told from those of live
ones and removed (``remove_orphan_temporaries``). Cached tensors carry a ``digest``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# mkstemp creates files readable by their owner only; results are shared like any other file.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

# A PID only means something on the machine (PID namespace) that issued it: a cache folder
# shared over a network or between containers holds temporaries of other hosts, which must be
# left alone. Hostnames may hold dots, so the name carries a short hash of it.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .<stem>.<host>-<pid>.<mkstemp's 8 random characters>.tmp<suffix>
TEMPORARY = re.compile(r"^\..*\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        dir=target.parent,
        prefix=f".{target.stem}.{HOST}-{os.getpid()}.",
        suffix=f".tmp{target.suffix}",
    )
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_orphan_temporaries(folder: Path) -> int:
    """Delete the temporaries of ``atomic_path`` under ``folder`` (recursively) whose writer,
    on this host, is no longer running; returns how many were deleted.

    A live writer's temporary is never touched (several runs may share a cache folder), nor one
    written on another host or by an older version (no PID in its name): neither can be judged.
    """
    removed = 0
    for path in Path(folder).rglob(".*.tmp*"):
        match = TEMPORARY.match(path.name)
        if match is None or match["host"] != HOST or _alive(int(match["pid"])):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another run cleaned it up first
            continue
        except OSError as error:
            log.warning("cannot remove the orphan temporary file %s (%s)", path, error)
            continue
        removed += 1
    return removed


def read_safetensors(path: Path | str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and its tensors, each copied into memory of its own.

    safetensors hands its tensors out at their offset in the file, so their alignment follows
    the length of the JSON header, which holds our metadata (keys, digests, image ids). A CPU's
    matrix products take other code paths for operands that are not 64-byte aligned and sum in
    another order (measured here: 24 of 60 misaligned products differed in their last bits), so
    every result would depend on how long a cache's header happens to be. A copy is aligned.
    safetensors' own errors (a bad header, a short file) propagate for the caller to word.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        # A safe_open handle is not iterable: .keys() is needed.
        names = list(handle.keys())
        tensors = {name: handle.get_tensor(name).clone() for name in names}
    return metadata, tensors


def digest(tensors: dict[str, torch.Tensor], info: str) -> str:
    """SHA-256 over ``info`` (the file's metadata) and every tensor's name, dtype, shape and
    bytes, in name order: any flipped bit, in a value or in the metadata, changes it."""
    hasher = hashlib.sha256(info.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _metadata_text(metadata: dict[str, str]) -> str:
    """The metadata a digest covers: everything but the digest itself."""
    return json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True)


def with_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sha256``, the digest of the tensors and of the rest of the metadata
    (a safetensors file's string map), so that a reader can verify both."""
    return {**metadata, "sha256": digest(tensors, _metadata_text(metadata))}


def digest_matches(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether ``metadata["sha256"]`` is the digest of these tensors and metadata."""
    return metadata.get("sha256") == digest(tensors, _metadata_text(metadata))


# safetensors reports an operating system error as text ending in "(os error N)"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_safetensors(
    target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``tensors`` (and their string ``metadata``) to ``target``, atomically. A failure of the
    disk (full, read-only...) is raised as the OSError it is, naming ``target``: safetensors
    raises its own error type, which says the same only in its message."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(target) as temporary:
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except SafetensorError as error:
            found = _OS_ERROR.search(str(error))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(target)) from error
        sort_metadata(temporary)


METADATA_START = b'{"__metadata__":{'


def _json_string_end(text: bytes, start: int) -> int:
    """The index just past the JSON string that opens at ``text[start]`` (a quote)."""
    index = start + 1
    while text[index : index + 1] != b'"':
        index += 2 if text[index : index + 1] == b"\\" else 1
    return index + 1


def sort_metadata(path: Path) -> None:
    """Put a safetensors file's metadata entries in key order, in place.

    safetensors writes its metadata map in the order of a Rust HashMap, which changes from
    process to process: the same tensors and metadata made files with different bytes. Sorted,
    the same content gives the same file. The entries are permuted as they were written (same
    bytes, same length), so nothing else in the file moves."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = handle.read(length)
        if not header.startswith(METADATA_START):
            return  # no metadata, or a layout this does not know: left as written
        entries, index = [], len(METADATA_START)
        while header[index : index + 1] == b'"':
            key_end = _json_string_end(header, index)
            value_end = _json_string_end(header, key_end + 1)  # past the ':'
            entries.append((json.loads(header[index:key_end]), header[index:value_end]))
            index = value_end + (header[value_end : value_end + 1] == b",")
        ordered = b",".join(entry for _, entry in sorted(entries))
        start = len(METADATA_START)
        if len(ordered) != index - start - (header[index - 1 : index] == b","):
            return  # not the layout above: left as written
        handle.seek(8 + start)
        handle.write(ordered)


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
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as error:  # e.g. a name longer than the file system allows
        return f"{error.strerror or error}"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    # the permission bits do not tell everything (root passes them; /proc and read-only mounts
    # refuse anyway): make a folder there and remove it
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
    except OSError as error:
        return f"no folder can be made in {existing} ({error.strerror or error})"
    return None
