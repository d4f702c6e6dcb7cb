"""One way to write a file or a folder so that a reader never sees it half-written.

Everything semst writes for others to read (cache index parts and spot tables, run folders, grid
cells, REPORT.md, figures, downloaded datasets) goes through :func:`atomic_write` or
:func:`atomic_directory`: the content is written under a temporary sibling name and renamed into
place, and a failure removes the temporary. ``durable=True`` also fsyncs the file and its folder,
for the cache, whose commit is the rename itself. A temporary folder names the process that fills it,
so the temporaries of a killed run are removed later (:func:`clean_stale_temporaries`) and those of
a run still writing are not.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object], durable: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Clean-up is best effort: on a read-only or full disk it fails too, and its error must not
        # hide the one that says what went wrong.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_parquet(path: str | Path, table, durable: bool = False) -> Path:
    """A pandas DataFrame (index dropped) or a pyarrow Table, as Parquet."""
    import pyarrow.parquet as pq

    if hasattr(table, "to_parquet"):
        return atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False), durable)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp), durable)


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True,
                     check_replace: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """Fill the yielded temporary folder; on success it becomes ``path``, on any failure it is removed
    and ``path`` is left as it was.

    The temporary is ``<parent>/.tmp-<name>-XXXXXXXX/content`` (mode from the umask, as ``mkdir``
    gives); its owner file says which process writes it, so :func:`clean_stale_temporaries` can remove
    it if that process is killed. An existing ``path`` is replaced only if ``replace``, and only after
    ``check_replace(path)`` (which raises to refuse) passes just before the swap; the swap is one atomic
    exchange where the file system offers it (Linux ``renameat2``), so a crash leaves the old or the new
    folder at ``path``, never neither. The old folder is removed afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = owned_temporary(path.parent, path.name)
    content = work / "content"
    try:
        content.mkdir()
        yield content
        _move_into_place(content, path, work, replace, check_replace)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)  # the previous version, if there was one


# --- temporary folders with an owner ---------------------------------------------------------------

TEMP_PREFIX = ".tmp-"
OWNER_FILE = ".semst-owner.json"  # inside a temporary folder: who writes it, where it goes
_PREVIOUS = "previous"  # inside a temporary folder: the old version while it is swapped out


def owned_temporary(parent: Path, name: str) -> Path:
    """A new ``<parent>/.tmp-<name>-XXXXXXXX`` folder holding its owner file (this process)."""
    work = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=parent))
    try:
        (work / OWNER_FILE).write_text(json.dumps({**_this_process(), "destination": name}))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_ticks(os.getpid()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux); tells a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def _owner_alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` (on this host) is still running."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True  # cannot tell: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    start = _start_ticks(pid)
    return owner.get("start") is None or start is None or start == owner["start"]


def _read_owner(work: Path) -> dict | None:
    try:
        owner = json.loads((work / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def clean_stale_temporaries(parent: str | Path, log: Callable[[str], object] = print) -> list[Path]:
    """Remove the ``.tmp-*`` folders in ``parent`` whose writer, a process of this host, is dead.

    A folder of a live process, of another host or without a readable owner file is kept (those two
    are reported in one line): it may belong to a run still writing. If a killed writer was between
    the two renames of a non-atomic swap, its old version is put back first. Returns what was removed.
    """
    parent = Path(parent)
    removed, unsure = [], []
    host = socket.gethostname()
    try:
        entries = sorted(parent.glob(f"{TEMP_PREFIX}*"))
    except OSError:
        return []
    for work in entries:
        if work.is_symlink() or not work.is_dir():
            continue
        owner = _read_owner(work)
        if owner is None or owner.get("host") != host:
            unsure.append(work)
            continue
        if _owner_alive(owner):
            continue
        _restore_previous(work, owner)
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work)
    if unsure:
        log(f"kept {len(unsure)} temporary folder(s) in {parent} of another host or an unknown writer "
            f"({', '.join(p.name for p in unsure)}); remove them yourself once no run writes there")
    return removed


def _restore_previous(work: Path, owner: dict) -> None:
    """A writer killed between moving the old version aside and the new one in: put the old one back."""
    previous = work / _PREVIOUS
    name = owner.get("destination")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        return
    destination = work.parent / name
    if previous.is_dir() and not os.path.lexists(destination):
        os.rename(previous, destination)


# --- the final rename ------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the kernel, libc or file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError, TypeError):  # not Linux/glibc
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _move_into_place(content: Path, path: Path, work: Path, replace: bool,
                     check_replace: Callable[[Path], object] | None) -> None:
    if not os.path.lexists(path):
        if not _renameat2(content, path, _RENAME_NOREPLACE):
            os.rename(content, path)
        return
    if not replace:
        raise FileExistsError(errno.EEXIST, "already exists", str(path))
    if check_replace is not None:
        check_replace(path)
    if _renameat2(content, path, _RENAME_EXCHANGE):
        return  # the old version is now ``content``, removed with ``work``
    # No atomic exchange here: old aside (inside our owned folder, so a killed run's next run puts it
    # back, see _restore_previous), then new in.
    os.rename(path, work / _PREVIOUS)
    try:
        os.rename(content, path)
    except BaseException:
        os.rename(work / _PREVIOUS, path)
        raise
