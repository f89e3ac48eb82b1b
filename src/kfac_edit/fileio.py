"""Atomic file writes: an interrupted run never leaves a file that loads as if it were complete.

Every file the package writes is written to a temporary file beside it, flushed, then renamed over the target
(atomic on POSIX). A write failing for a reason the user can fix (disk full, read-only filesystem, no permission)
is a one-line :class:`~kfac_edit.errors.UserError`, the old target left as it was. Every command also checks each
output before any work (:func:`check_output`) and holds its :func:`output_lock` while it writes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .constants import CACHE_ENV
from .errors import UserError

_USER_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}  # fmt: skip


@contextlib.contextmanager
def _write_errors(target: Path, cleanup=None) -> Iterator[None]:
    """Run the block; on an exception call ``cleanup``, then raise a write failure the user can fix as a one-line
    :class:`UserError`, anything else (a bug, an interrupt) as it is. Fixable: by the errno of an ``OSError``, or
    the one another exception's message names (safetensors says ``... os error 28 ...`` in its own type).
    """
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            cleanup()
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None and isinstance(exc, Exception):
            found = re.search(r"(?:os error|\[Errno)\s*(\d+)", str(exc))
            code = int(found.group(1)) if found else None
        if code not in _USER_ERRNOS:
            raise
        raise UserError(f"cannot write {target}: {_USER_ERRNOS[code]}; free space or pick another location (nothing "
                        "was replaced)") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``, on error removed."""
    target = Path(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    with _write_errors(target, cleanup=lambda: tmp_path.unlink(missing_ok=True)):
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` whole.

    Files already in ``target`` that the caller wants to keep must be written again into the temporary directory.
    """
    target = Path(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; the result should read like a plain mkdir's
    with _write_errors(target, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)


def read_text(path: str | os.PathLike, what: str, expected: str) -> str:
    """The UTF-8 text of ``path``; a binary or unreadable file is one :class:`UserError` naming ``what`` it is
    (e.g. "records file") and the ``expected`` content (e.g. "a JSONL memorized set")."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start}: {e.reason}); give {expected}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}") from None


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON text :func:`write_json` writes."""
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json_text(obj))


def append_jsonl(target: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``target`` (a whole line per write, flushed and synced); a failed write puts the file
    back as it was (no torn line)."""
    target = Path(target)
    line = json.dumps(record, default=_json_default) + "\n"
    size = target.stat().st_size if target.is_file() else None

    def put_back() -> None:
        with contextlib.suppress(OSError):
            if size is None:
                target.unlink(missing_ok=True)
            else:
                os.truncate(target, size)

    with _write_errors(target, cleanup=put_back):
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def utc_timestamp() -> str:
    """The current UTC time as the records write it, e.g. ``2026-12-01T13:30:58+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (none: no records), skipping a torn last line (one left by a killed writer); a malformed
    line elsewhere raises ``ValueError("line N: ...")`` (1-based)."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"line {i + 1}: {exc.msg} at column {exc.colno}") from None
    return records


def check_output(path: str | os.PathLike | None, kind: str = "dir", flag: str = "--out",
                 overwrite: bool | None = None) -> Path | None:
    """Refuse, before any work, an output (``kind`` ``"dir"``, ``"file"`` or ``"jsonl"``: a file lines are appended
    to) that cannot be written: one line naming ``flag``. Refused: a file where a directory goes and the reverse; a
    path under a file; a nearest existing directory that is read-only (or not ours) or on a full disk; with
    ``overwrite=False``, an existing file; for ``"jsonl"``, an existing file whose first line is no JSON object.
    Nothing is created; ``None`` passes through (no output asked for)."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir() and kind != "dir":
        raise UserError(f"{flag} {out} is a directory; give a file path, e.g. {out / 'results.jsonl'}")
    if kind == "jsonl" and out.is_file() and not _starts_json_lines(out):
        raise UserError(f"{flag} {out} exists and is not JSONL (its first line is no JSON object); results are "
                        "appended to it: give a new path or a results .jsonl")
    if out.exists() and not out.is_dir() and kind == "dir":
        raise UserError(f"{flag} {out} is a file; give a directory")
    if out.is_file() and overwrite is False:
        raise UserError(f"{flag} {out} exists; pass --overwrite to replace it or pick another path")
    existing = out if out.is_dir() else next((d for d in out.parents if d.exists()), out.parent)
    if not existing.is_dir():
        raise UserError(f"{flag} {out} is under {existing}, which is a file; pick another path")
    try:
        tempfile.TemporaryFile(prefix=".kfac-edit-probe.", dir=existing).close()  # can we write there?
    except OSError as exc:
        why = _USER_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
        raise UserError(f"{flag} {out} cannot be written ({existing}: {why}); pick another path") from None
    if shutil.disk_usage(existing).free == 0:
        raise UserError(f"{flag} {out} cannot be written ({existing}: no space left on the device); free space first")
    return out


def check_not_input(output: str | os.PathLike | None, flag: str, inputs: dict[str, Any]) -> None:
    """Refuse an output that is also an existing input (``inputs``: flag -> a path, a list of them, or None): writing
    it would overwrite, or append to, what the command reads."""
    if output is None:
        return
    out = Path(output).expanduser().resolve()
    for name, paths in inputs.items():
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            if path and Path(path).expanduser().exists() and Path(path).expanduser().resolve() == out:
                raise UserError(f"{flag} {output} is also the {name} input; give the output another path")


def _starts_json_lines(path: Path) -> bool:
    """Whether ``path`` is empty or its first line (at most 16 MiB read) is a JSON object."""
    with open(path, "rb") as fh:
        first = fh.readline(16 << 20)
    try:
        return not first.strip() or isinstance(json.loads(first), dict)
    except ValueError:  # not JSON, not UTF-8
        return False


_HELD_LOCKS: set[Path] = set()  # the lock files this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


@contextlib.contextmanager
def output_lock(target: str | os.PathLike | None) -> Iterator[None]:
    """Hold the write lock of output ``target`` (a file or directory): ``.NAME.kfac-edit.lock`` beside it.

    Another process is refused (a :class:`UserError` naming the holder's pid) while the holder lives; a lock whose
    pid is gone (on this host) is taken over; the same process may nest it. ``None``: no lock. Under ``torchrun``
    only rank 0 (the rank that writes) takes it, so the other ranks of the job are not refused.
    """
    if target is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    target = Path(target).expanduser().absolute()
    lock = target.parent / f".{target.name}.kfac-edit.lock"
    if lock in _HELD_LOCKS:  # nested: the outer holder releases it
        yield
        return
    # the directories made to hold the lock (deepest first): removed again if the command leaves them empty
    created = list(itertools.takewhile(lambda directory: not directory.exists(), lock.parents))
    with _write_errors(target):
        lock.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for _ in range(3):
        try:
            with _write_errors(target):
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, holder_host = int(holder["pid"]), str(holder.get("host", host))
            except (OSError, ValueError, KeyError, TypeError):
                pid, holder_host = None, host  # half-written by a writer that died at once: stale
            if pid is not None and (holder_host != host or _pid_alive(pid)):
                where = "" if holder_host == host else f" on {holder_host}"
                raise UserError(f"{target} is being written by another kfac-edit (pid {pid}{where}); wait for it to "
                                f"finish or pick another output (if no such process runs, delete {lock})") from None
            lock.unlink(missing_ok=True)  # stale: its writer is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "host": host}))
        break
    else:  # pragma: no cover - three racing takeovers
        raise UserError(f"cannot take the lock {lock}; retry")
    _HELD_LOCKS.add(lock)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(lock)
        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # stops at the first directory the command wrote into
            for directory in created:
                directory.rmdir()


def cache_root(sub: str | None = None) -> Path:
    """The package's cache directory: ``$KFAC_EDIT_CACHE`` if set, else ``~/.cache/kfac-edit``; ``sub`` appended.

    Sub-directories in use: ``eigen`` (eigendecompositions), ``ndcg`` (reference top-k), ``testbed`` (testbeds).
    """
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "kfac-edit"
    return root / sub if sub else root


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy and torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")
