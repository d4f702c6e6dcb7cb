"""`semst data NAME`: fetch a registered dataset from its public source into data/raw/NAME/.

Everything goes into a temporary folder beside the destination; files are checked (SHA-256 and size
where the registry knows them), archives unpacked, and the result must load as a valid dataset
before the folder is renamed into place. Any failure removes the temporary folder, so a half-written
dataset is never left behind. ``mirror`` (or ``SEMST_DATA_MIRROR``) replaces the scheme and host of
every source URL: a local mirror, or the HTTP server the tests start.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from semst.shared import paths
from semst.shared.datasets import DATASETS, DatasetError, DatasetSpec, load_dataset
from semst.shared.errors import SemstError
from semst.shared.io import atomic_directory

_CHUNK = 1 << 20


class DownloadError(SemstError, RuntimeError):
    """A download failed or did not verify; nothing was left behind."""


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` with its scheme and host replaced by ``mirror`` (path kept)."""
    if not mirror:
        return url
    src, dst = urllib.parse.urlsplit(url), urllib.parse.urlsplit(mirror.rstrip("/"))
    return urllib.parse.urlunsplit((dst.scheme, dst.netloc, dst.path + src.path, src.query, ""))


def _fetch(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` to ``dest``; returns the SHA-256 of what was written."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DownloadError(f"could not download {url}: {exc}") from None
    return h.hexdigest()


def download_dataset(name: str, root: str | Path | None = None, mirror: str | None = None,
                     spec: DatasetSpec | None = None, timeout: float = 60.0, force: bool = False) -> Path:
    """Download, verify and install dataset ``name``; returns its folder (already present: no download)."""
    spec = spec or DATASETS.get(name)
    if spec is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    if not spec.files:
        raise DatasetError(f"{name} has no public download registered; put {name}.h5ad in {paths.raw_dir()} "
                           f"or a folder on SEMST_DATA_PATH")
    mirror = mirror or os.environ.get("SEMST_DATA_MIRROR")
    root = Path(root) if root else paths.raw_dir()
    final = root / name
    if final.exists() and not force:
        return final
    with atomic_directory(final) as tmp:
        for f in spec.files:
            url = mirrored(f.url, mirror)
            target = tmp / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = _fetch(url, target, timeout)
            if f.sha256 and digest != f.sha256:
                raise DownloadError(f"{url}: SHA-256 {digest} does not match the registry's {f.sha256}")
            if f.size is not None and target.stat().st_size != f.size:
                raise DownloadError(f"{url}: {target.stat().st_size} bytes, expected {f.size}")
            if f.extract:
                with tarfile.open(target) as tar:
                    tar.extractall(target.parent, filter="data")
                target.unlink()
        _verify_loads(name, tmp)
    return final


def _verify_loads(name: str, folder: Path) -> None:
    """The downloaded folder must load as a valid dataset (the structure check where no checksum is known)."""
    try:
        adata = load_dataset(name, path=folder)
    except DatasetError as exc:
        raise DownloadError(f"downloaded files of {name} do not form a valid dataset: {exc}") from None
    if adata.n_obs == 0:
        raise DownloadError(f"downloaded {name} has no spots")
