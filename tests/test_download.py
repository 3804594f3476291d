"""flatnb.data.download: the real download code against a local HTTP server on 127.0.0.1.

Success, checksum mismatch, a connection cut mid-file, 404 and an unwritable
folder, for Tiny ImageNet (flatnb's own fetch) and CIFAR-10 (torchvision's
downloader, its URL and MD5 lists pointed at the local server). Every failure
must name the file, the URL and the fix, and leave no file behind.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import encode_jpeg

from flatnb import data
from flatnb.data import datasets
from flatnb.data import download as dl

WNIDS = ["n0001", "n0002"]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNB_CACHE", str(tmp_path / "cache"))


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, body: bool):
        path = self.path.split("?")[0]
        cut = path.startswith("/cut/")
        payload = self.files.get(path[4:] if cut else path)
        if payload is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(payload[: len(payload) // 2] if cut else payload)
            self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        self._send(True)

    def do_HEAD(self):
        self._send(False)


@pytest.fixture
def server():
    """``(base_url, files)``: put bytes at ``files['/name']``; ``/cut/name`` sends half and hangs up."""
    files: dict[str, bytes] = {}
    handler = type("H", (_Handler,), {"files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()
    httpd.server_close()


def _jpeg(colour, size=64) -> bytes:
    img = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).contiguous()
    return encode_jpeg(img, quality=95).numpy().tobytes()


def tiny_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "\n".join(WNIDS) + "\n")
        for c, w in enumerate(WNIDS):
            for i in range(2):
                zf.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{i}.JPEG", _jpeg((40 * c, 50, 60 + i)))
        zf.writestr("tiny-imagenet-200/val/images/val_0.JPEG", _jpeg((0, 50, 60)))
        zf.writestr("tiny-imagenet-200/val/val_annotations.txt", f"val_0.JPEG\t{WNIDS[0]}\t0\t0\t63\t63\n")
    return buf.getvalue()


def _point_tiny(monkeypatch, url, payload, **over):
    entry = {"url": url, "filename": "tiny-imagenet-200.zip", "sha256": hashlib.sha256(payload).hexdigest(),
             "md5": hashlib.md5(payload).hexdigest(), "size": len(payload), **over}
    monkeypatch.setitem(dl.SOURCES, "tinyimagenet", entry)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_tiny_download_on_a_fresh_machine(tmp_path, server, monkeypatch):
    """No data folder, no FLATNB_DATA, an empty HOME: the default root is created and filled."""
    base, files = server
    files["/tiny.zip"] = payload = tiny_zip()
    _point_tiny(monkeypatch, base + "/tiny.zip", payload)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FLATNB_DATA", raising=False)
    monkeypatch.chdir(home)
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.load("tinyimagenet", "train")
    ds = data.load("tinyimagenet", "train", download=True)
    root = home / ".cache" / "flatnb" / "data"
    assert _leftovers(root) == ["tiny-imagenet-200.zip"]
    assert (root / "tiny-imagenet-200.zip").read_bytes() == payload
    assert len(ds) == 4 and ds.classes == WNIDS and ds.labels.tolist() == [0, 0, 1, 1]
    assert "Tiny ImageNet" in ds.source
    te = data.load("tinyimagenet", "test", download=True)  # found now: no second download
    assert len(te) == 1
    files.clear()  # the server forgets the file: a load must not need it any more
    assert len(data.load("tinyimagenet", "train", download=True, cache=False)) == 4


def _expect_clean_failure(excinfo, url: str, filename: str, root: Path, what: str):
    msg = str(excinfo.value)
    assert filename in msg and url in msg and "To fix" in msg and what in msg, msg
    assert _leftovers(root) == [], _leftovers(root)


@pytest.mark.parametrize("case", ["sha256", "md5", "size", "cut", "404"])
def test_tiny_download_failures_leave_nothing(tmp_path, server, monkeypatch, case):
    base, files = server
    files["/tiny.zip"] = payload = tiny_zip()
    url = {"cut": base + "/cut/tiny.zip", "404": base + "/missing.zip"}.get(case, base + "/tiny.zip")
    over = {"sha256": {"sha256": "0" * 64}, "md5": {"md5": "0" * 32}, "size": {"size": len(payload) + 1}}.get(case, {})
    _point_tiny(monkeypatch, url, payload, **over)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(dl.DownloadError) as e:
        data.load("tinyimagenet", "train", root=root, download=True)
    what = {"sha256": "SHA-256 check", "md5": "MD5 check", "size": "expected", "cut": "cut off", "404": "404"}[case]
    _expect_clean_failure(e, url, "tiny-imagenet-200.zip", root, what)
    # and nothing was cached or counts as data: a load without download still says "not found"
    with pytest.raises(FileNotFoundError):
        data.load("tinyimagenet", "train", root=root)


def test_unwritable_folder(tmp_path, server, monkeypatch):
    base, files = server
    files["/tiny.zip"] = payload = tiny_zip()
    _point_tiny(monkeypatch, base + "/tiny.zip", payload)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(dl.DownloadError) as e:  # a folder that cannot be created (works as root too)
        data.load("tinyimagenet", "train", root=blocker / "data", download=True)
    msg = str(e.value)
    assert str(blocker / "data") in msg and base + "/tiny.zip" in msg and "FLATNB_DATA" in msg
    assert "tiny-imagenet-200.zip" in msg
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(dl.DownloadError, match="cannot be created or written"):
                data.load("tinyimagenet", "train", root=ro, download=True)
            assert _leftovers(ro) == []
        finally:
            ro.chmod(0o755)


def test_fetch_file_url_and_content_length(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"x" * 1000)
    out = dl.fetch(src.as_uri(), tmp_path / "out" / "blob.bin", sha256=hashlib.sha256(b"x" * 1000).hexdigest())
    assert out.read_bytes() == b"x" * 1000 and _leftovers(out.parent) == ["blob.bin"]


# ----------------------------------------------------------------------------- CIFAR through torchvision

def cifar10_tarball() -> tuple[bytes, dict]:
    """A tiny ``cifar-10-python.tar.gz`` (2 images per batch) and the MD5s torchvision checks."""
    rng = np.random.default_rng(0)
    members, md5s = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        members[name] = pickle.dumps({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                                      "labels": [k % 10, (k + 1) % 10]})
    members["batches.meta"] = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, b in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
            md5s[name] = hashlib.md5(b).hexdigest()
    return buf.getvalue(), md5s


def _point_cifar10(monkeypatch, url: str, payload: bytes, md5s: dict, tgz_md5: str | None = None):
    from flatnb import data

    monkeypatch.setattr(datasets, "CIFAR10_SHA256", {})  # a synthetic tarball, not the real CIFAR-10
    C = torchvision.datasets.CIFAR10
    monkeypatch.setattr(C, "url", url)
    monkeypatch.setattr(C, "tgz_md5", tgz_md5 or hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(C, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(C, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(C, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5s["batches.meta"]})


def test_cifar10_download_through_torchvision(tmp_path, server, monkeypatch):
    base, files = server
    payload, md5s = cifar10_tarball()
    files["/cifar-10-python.tar.gz"] = payload
    _point_cifar10(monkeypatch, base + "/cifar-10-python.tar.gz", payload, md5s)
    root = tmp_path / "fresh" / "data"  # does not exist yet
    tr = data.load("cifar10", "train", root=root, download=True)
    te = data.load("cifar10", "test", root=root, download=True)
    assert len(tr) == 10 and len(te) == 2 and tr.classes == [f"c{i}" for i in range(10)]
    assert tr.source == "CIFAR-10, original (torchvision's cifar-10-batches-py)" == data.source_description("cifar10", root)
    assert _leftovers(root) == ["cifar-10-batches-py"]  # no tarball, no staging folder


@pytest.mark.parametrize("case", ["md5", "404", "cut"])
def test_cifar10_download_failures_leave_nothing(tmp_path, server, monkeypatch, case):
    base, files = server
    payload, md5s = cifar10_tarball()
    files["/cifar-10-python.tar.gz"] = payload
    url = base + {"404": "/nothing.tar.gz", "cut": "/cut/cifar-10-python.tar.gz"}.get(case, "/cifar-10-python.tar.gz")
    _point_cifar10(monkeypatch, url, payload, md5s, tgz_md5="0" * 32 if case == "md5" else None)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(dl.DownloadError) as e:
        data.load("cifar10", "train", root=root, download=True)
    _expect_clean_failure(e, url, "cifar-10-python.tar.gz", root, "torchvision")


def test_download_is_the_default_in_colab_or_with_flatnb_download(monkeypatch):
    import sys
    import types

    from flatnb import data

    monkeypatch.delenv("FLATNB_DOWNLOAD", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert data.download_default() is False
    monkeypatch.setenv("FLATNB_DOWNLOAD", "1")
    assert data.download_default() is True
    monkeypatch.delenv("FLATNB_DOWNLOAD")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert data.download_default() is True
