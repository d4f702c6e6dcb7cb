"""One way to write a file or a folder so that a reader never sees it half-written.

Everything semst writes for others to read (cache index parts and spot tables, run folders, grid
cells, REPORT.md, figures, downloaded datasets) goes through :func:`atomic_write` or
:func:`atomic_directory`: the content is written under a temporary sibling name and renamed into
place, and a failure removes the temporary. ``durable=True`` also fsyncs the file and its folder,
for the cache, whose commit is the rename itself.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Fill the yielded temporary folder; on success it becomes ``path`` (replacing an old one if
    ``replace``), on any failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists() and replace:
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
