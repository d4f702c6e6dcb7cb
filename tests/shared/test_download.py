"""`semst data`: download from a (local) HTTP server, verify, and never leave half a dataset."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from semst.shared.datasets import DatasetSpec, RemoteFile, load_dataset
from semst.shared.download import DownloadError, download_dataset

GENES = ["Snap25", "Gfap", "Mbp", "Plp1", "Nrgn", "Calm2"]


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """A Space Ranger (v3) filtered_feature_bc_matrix.h5: genes x barcodes CSC."""
    import scipy.sparse as sp

    m = sp.csc_matrix(counts.T.astype(np.int32))  # features x barcodes, column per barcode
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        feat = g.create_group("features")
        feat["name"] = np.array(genes, dtype="S")
        feat["id"] = np.array([f"ENSMUSG{i:011d}" for i in range(len(genes))], dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feat["genome"] = np.array(["mm10"] * len(genes), dtype="S")


@pytest.fixture
def served(tmp_path):
    """A tiny Space Ranger output + annotation served over HTTP on 127.0.0.1 (stopped afterwards)."""
    site = tmp_path / "site" / "sample"
    site.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 12
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    write_10x_h5(site / "matrix.h5", rng.poisson(3, size=(n, len(GENES))), barcodes, GENES)
    positions = "\n".join(f"{b},1,{i // 4},{i % 4},{100 + 10 * (i // 4)},{200 + 10 * (i % 4)}"
                          for i, b in enumerate(barcodes)) + "\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = positions.encode()
        info = tarfile.TarInfo("spatial/tissue_positions_list.csv")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (site / "spatial.tar.gz").write_bytes(buf.getvalue())
    (site / "truth.tsv").write_text("barcode\tground_truth\n" + "".join(
        f"{b}\t{'L1' if i < 6 else 'L2'}\n" for i, b in enumerate(barcodes)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", site
    server.shutdown()
    server.server_close()


def spec(files) -> DatasetSpec:
    return DatasetSpec(name="toy", title="toy slide", platform="10x Visium", citation="test",
                       files=tuple(files), annotation="annotation.tsv")


def toy_files(site: Path, h5_sha: str | None = None, truth="truth.tsv"):
    # Registry URLs name the public host; the mirror swaps it for the local server.
    return [RemoteFile("https://example.org/sample/matrix.h5", "filtered_feature_bc_matrix.h5",
                       sha256=h5_sha or hashlib.sha256((site / "matrix.h5").read_bytes()).hexdigest()),
            RemoteFile("https://example.org/sample/spatial.tar.gz", "spatial.tar.gz", extract=True),
            RemoteFile(f"https://example.org/sample/{truth}", "annotation.tsv")]


def test_a_download_gives_a_dataset_that_loads(served, tmp_path):
    url, site = served
    root = tmp_path / "raw"
    path = download_dataset("toy", root=root, mirror=url, spec=spec(toy_files(site)))
    assert path == root / "toy"
    adata = load_dataset("toy", path=path)
    assert adata.shape == (12, 6)
    assert adata.obs["ground_truth"].value_counts().to_dict() == {"L1": 6, "L2": 6}
    np.testing.assert_array_equal(adata.obsm["spatial"][1], [210.0, 100.0])
    assert [p.name for p in root.iterdir()] == ["toy"]


def test_a_checksum_mismatch_leaves_nothing_behind(served, tmp_path):
    url, site = served
    root = tmp_path / "raw"
    with pytest.raises(DownloadError, match="does not match"):
        download_dataset("toy", root=root, mirror=url, spec=spec(toy_files(site, h5_sha="0" * 64)))
    assert list(root.iterdir()) == []


def test_a_missing_file_on_the_server_leaves_nothing_behind(served, tmp_path):
    url, site = served
    root = tmp_path / "raw"
    with pytest.raises(DownloadError, match="404"):
        download_dataset("toy", root=root, mirror=url, spec=spec(toy_files(site, truth="gone.tsv")))
    assert list(root.iterdir()) == []


def test_files_that_do_not_form_a_dataset_are_refused_and_removed(served, tmp_path):
    url, site = served
    (site / "matrix.h5").write_bytes(b"not hdf5")
    root = tmp_path / "raw"
    files = toy_files(site)
    files[0] = RemoteFile(files[0].url, files[0].path)  # no checksum: the structure check must catch it
    with pytest.raises(DownloadError, match="do not form a valid dataset"):
        download_dataset("toy", root=root, mirror=url, spec=spec(files))
    assert list(root.iterdir()) == []


def test_a_dataset_already_present_is_not_downloaded_again(served, tmp_path):
    url, site = served
    root = tmp_path / "raw"
    (root / "toy").mkdir(parents=True)
    assert download_dataset("toy", root=root, mirror="http://127.0.0.1:9", spec=spec(toy_files(site))) == root / "toy"
