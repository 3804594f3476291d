"""flatnb.models.weights: export, load by path and by file:// URL, SHA-256 checks, corrupt and misfit files."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from flatnb.models import weights as W


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNB_CACHE", str(tmp_path / "cache"))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_then_load_by_path_and_file_url(tmp_path):
    src = _net(0)
    src[1].running_mean.add_(0.5)  # buffers travel too
    path = tmp_path / "out" / "net.pt"
    path.parent.mkdir()
    sha = W.export_weights(src, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "net.pt.sha256").read_text() == f"{sha}  net.pt\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["net.pt", "net.pt.sha256"]  # no temp files

    dst = _net(1)
    assert not _same(src, dst)
    assert W.load_weights(dst, path) is dst and _same(src, dst)  # the .sha256 beside it is checked

    dst = _net(2)
    W.load_weights(dst, path.as_uri(), sha256=sha)
    assert _same(src, dst)
    cached = list((tmp_path / "cache" / "weights").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == path.read_bytes()
    path.unlink()  # the cached download is reused, the source is no longer needed
    dst = _net(3)
    W.load_weights(dst, (tmp_path / "out" / "net.pt").as_uri(), sha256=sha)
    assert _same(src, dst)


def test_sha_mismatch_and_corrupt_files(tmp_path):
    src = _net(0)
    path = tmp_path / "net.pt"
    sha = W.export_weights(src, path)
    blob = path.read_bytes()

    # a wrong hash: for a URL the download is removed, nothing is loaded
    dst, before = _net(1), _net(1)
    with pytest.raises(W.WeightsError, match="SHA-256") as e:
        W.load_weights(dst, path.as_uri(), sha256="0" * 64)
    assert "net.pt" in str(e.value) and "To fix" in str(e.value) and path.as_uri() in str(e.value)
    assert not (tmp_path / "cache" / "weights").exists() or not list((tmp_path / "cache" / "weights").iterdir())
    assert _same(dst, before)

    # a corrupted file (one byte flipped) against its .sha256
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(W.WeightsError, match="SHA-256") as e:
        W.load_weights(dst, path)
    assert str(path) in str(e.value) and "To fix" in str(e.value)

    # a truncated file without a hash to check: torch cannot read it, the error names it
    path.write_bytes(blob[: len(blob) // 2])
    (tmp_path / "net.pt.sha256").unlink()
    with pytest.raises(W.WeightsError, match="cannot be read") as e:
        W.load_weights(dst, path)
    assert str(path) in str(e.value)
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(W.WeightsError, match="cannot be read"):
        W.load_weights(dst, path.as_uri())
    assert _same(dst, before)


def test_misfit_and_missing(tmp_path):
    path = tmp_path / "net.pt"
    W.export_weights(_net(0), path)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(W.WeightsError, match="does not fit"):
        W.load_weights(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.load_weights(other, tmp_path / "nope.pt")
    with pytest.raises(W.WeightsError, match="404|cannot|failed"):
        W.load_weights(other, (tmp_path / "nope.pt").as_uri())
