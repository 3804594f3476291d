"""flatnb.data: every loader on synthetic data in each format, bad input, cache, batching."""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.io import encode_jpeg

from flatnb import data
from flatnb.data import archives, datasets

CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _synthetic_cifar10(request, monkeypatch):
    """The synthetic CIFAR-10 copies below are not the real dataset: tests that check the SHA-256 gate
    set the expected digests themselves (the real-data test keeps the package's gate on)."""
    if not request.node.name.startswith("test_real_data"):
        monkeypatch.setattr(datasets, "CIFAR10_SHA256", {})


def _flat_image(colour, size) -> torch.Tensor:
    """A constant-colour image: JPEG keeps it almost exactly, so decoded pixels are checkable."""
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).contiguous()


def _colour(i: int, c: int):
    return (20 * c + 5, (37 * i) % 250, 200 - 10 * c)


def _write_jpeg(path: Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(img, quality=100).numpy().tobytes())


def _write_webp(path: Path, img: torch.Tensor) -> None:
    """Lossless WebP, as in ../shared/data/cifar10-webp.tar.gz (decodes to the exact pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "WEBP", lossless=True)
    path.write_bytes(buf.getvalue())


def make_cifar10_webp(root: Path, n_per_class=(3, 2), classes=CLASSES10[:3], seed=0) -> Path:
    """``cifar10/<split>/<class>/<index>_<name>.webp`` with random pixels and the classes interleaved
    (index i has class i % len(classes)), so the loader must sort by index, not by folder."""
    base = root / "cifar10"
    g = torch.Generator().manual_seed(seed)
    for split, n in zip(("train", "test"), n_per_class):
        for i in range(n * len(classes)):
            name = classes[i % len(classes)]
            img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
            _write_webp(base / split / name / f"{i:05d}_{name}_s_{i:06d}.webp", img)
    return base


def _expected(base: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's arrays, decoded independently of flatnb (PIL), in index order."""
    files = sorted((base / split).glob("*/*.webp"), key=lambda p: int(p.name.split("_")[0]))
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                        for f in files])
    labels = torch.tensor([CLASSES10.index(f.parent.name) for f in files])
    return imgs, labels


def _tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=src.name)
    return dest


def _check_flat(ds: data.Dataset, size: int):
    """Every decoded image is its constant colour (±3 levels of JPEG error), labels match."""
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert ds.images.shape[1:] == (3, size, size)
    for img, lab in zip(ds.images, ds.labels):
        mean = img.float().mean((1, 2))
        assert (img.float() - mean[:, None, None]).abs().max() <= 3
        # colour encodes the class: first channel 20c + 5
        assert abs(mean[0].item() - (20 * lab.item() + 5)) <= 3


@pytest.mark.parametrize("fmt", ["folder", "tar.gz"])
def test_cifar10_webp(tmp_path, fmt):
    base = make_cifar10_webp(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    if fmt == "folder":
        shutil.move(str(base), root / "cifar10")
    else:
        _tar(base, root / "cifar10-webp.tar.gz")
    base = tmp_path / "src" / "cifar10" if fmt != "folder" else root / "cifar10"
    tr = data.load("cifar10", "train", root=root)
    te = data.load("cifar10", "test", root=root)
    assert len(tr) == 9 and len(te) == 6
    assert tr.classes == CLASSES10  # torchvision's class list, whatever folders exist
    assert tr.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # index order, not folder order
    for ds, split in ((tr, "train"), (te, "test")):
        imgs, labels = _expected(base, split)
        assert torch.equal(ds.images, imgs) and torch.equal(ds.labels, labels)  # lossless: bit-identical
    assert tr.digest != te.digest and "original" in tr.source and "JPEG" not in tr.source


def test_cifar10_sha256_gate(tmp_path, monkeypatch):
    """The decoded arrays must carry the SHA-256 the data README states; another copy is an error naming
    the archive and the fix, never silent data. The digest is computed here with hashlib on an HWC array."""
    import hashlib

    base = make_cifar10_webp(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    arch = _tar(base, root / "cifar10-webp.tar.gz")
    imgs, labels = _expected(base, "test")
    good = (hashlib.sha256(imgs.permute(0, 2, 3, 1).contiguous().numpy().tobytes()).hexdigest(),
            hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest())
    monkeypatch.setattr(datasets, "CIFAR10_SHA256", {"test": good})
    assert torch.equal(data.load("cifar10", "test", root=root, cache=False).images, imgs)
    monkeypatch.setattr(datasets, "CIFAR10_SHA256", {"test": (good[0][::-1], good[1])})
    with pytest.raises(ValueError, match="not the original dataset.*pixels") as e:
        data.load("cifar10", "test", root=root, cache=False)
    assert str(arch) in str(e.value) and "To fix" in str(e.value)
    monkeypatch.setattr(datasets, "CIFAR10_SHA256", {"test": (good[0], good[1][::-1])})
    with pytest.raises(ValueError, match="labels"):
        data.load("cifar10", "test", root=root, cache=False)


def test_cifar10_webp_with_a_missing_image_is_incomplete(tmp_path):
    base = make_cifar10_webp(tmp_path)
    next((base / "train").glob("*/00004_*.webp")).unlink()
    with pytest.raises(ValueError, match="first gap at 4.*incomplete"):
        data.load("cifar10", "train", root=tmp_path)


def _write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar100_pickle(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-100-python"
    names = [f"class{i:03d}" for i in range(100)]
    arrays = {}
    for split, n in (("train", 30), ("test", 12)):
        arr = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        arrays[split] = (arr, fine)
        _write_pickle(base / split, {"data": arr, "fine_labels": fine, "coarse_labels": [0] * n, "filenames": []})
    _write_pickle(base / "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20})
    for split in ("train", "test"):
        ds = data.load("cifar100", split, root=tmp_path)
        arr, fine = arrays[split]
        assert ds.classes == names
        assert ds.labels.tolist() == fine
        # pickle rows are R plane, G plane, B plane of 32x32, row-major
        expect = torch.from_numpy(arr.reshape(-1, 3, 32, 32).copy())
        assert torch.equal(ds.images, expect)
        assert ds.images[1, 2, 3, 4].item() == arr[1, 2 * 1024 + 3 * 32 + 4]


def test_cifar10_pickle(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    batches = []
    for i in range(1, 6):
        arr = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, 4).tolist()
        batches.append((arr, lab))
        _write_pickle(base / f"data_batch_{i}", {"data": arr, "labels": lab})
    _write_pickle(base / "test_batch", {"data": batches[0][0], "labels": batches[0][1]})
    _write_pickle(base / "batches.meta", {"label_names": CLASSES10})
    ds = data.load("cifar10", "train", root=tmp_path)
    assert len(ds) == 20 and ds.classes == CLASSES10
    assert ds.labels.tolist() == sum((b[1] for b in batches), [])
    assert torch.equal(ds.images[4:8], torch.from_numpy(batches[1][0].reshape(-1, 3, 32, 32).copy()))


WNIDS = ["n0001", "n0002", "n0003"]


def make_tiny(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")  # order in file must not matter
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    for c, w in enumerate(WNIDS):
        for i in range(2):
            _write_jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", _flat_image(_colour(i, c), 64))
        (base / "train" / w / f"{w}_boxes.txt").write_text("boxes\n")
    lines = []
    for j, c in enumerate([2, 0, 1, 2]):
        img = _flat_image(_colour(j, c), 64)
        if j == 3:  # a grayscale JPEG, as Tiny ImageNet has some: must come out as 3 channels
            img = img[:1].clone()
            img.fill_(20 * c + 5)
        _write_jpeg(base / "val" / "images" / f"val_{j}.JPEG", img)
        lines.append(f"val_{j}.JPEG\t{WNIDS[c]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _write_jpeg(base / "test" / "images" / "test_0.JPEG", _flat_image((0, 0, 0), 64))  # unlabelled: ignored
    return base


@pytest.mark.parametrize("fmt", ["folder", "tar.gz", "zip"])
def test_tinyimagenet(tmp_path, fmt):
    base = make_tiny(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    if fmt == "folder":
        shutil.move(str(base), root / base.name)
    elif fmt == "tar.gz":
        _tar(base, root / "tiny-imagenet-200.tar.gz")
    else:
        with zipfile.ZipFile(root / "tiny-imagenet-200.zip", "w") as zf:
            for p in sorted(base.rglob("*")):
                zf.write(p, p.relative_to(base.parent).as_posix())
    tr = data.load("tinyimagenet", "train", root=root)
    te = data.load("tinyimagenet", "test", root=root)
    assert tr.classes == WNIDS and te.classes == WNIDS
    assert tr.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(te.labels.tolist()) == [0, 1, 2, 2] and len(te) == 4
    _check_flat(tr, 64)
    _check_flat(te, 64)


def test_corrupt_image_names_file(tmp_path):
    base = make_cifar10_webp(tmp_path)
    bad = next((base / "train" / "bird").glob("00002_*.webp"))
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WEBP this is not a webp")
    with pytest.raises(ValueError, match=bad.name):
        data.load("cifar10", "train", root=tmp_path)


def test_missing_root_and_dataset(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="FLATNB_DATA") as e:
        data.data_root(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    monkeypatch.setenv("FLATNB_DATA", str(tmp_path / "also-nope"))
    with pytest.raises(FileNotFoundError, match="also-nope"):
        data.load("cifar10", "train")
    monkeypatch.setenv("FLATNB_DATA", str(tmp_path))
    assert data.data_root() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="cifar10-webp.tar.gz"):  # lists what it looked for
        data.load("cifar10", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("mnist", "train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load("cifar10", "val", root=tmp_path)


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    base = make_cifar10_webp(tmp_path)
    first = data.load("cifar10", "test", root=tmp_path)
    files = list((Path(os.environ["FLATNB_CACHE"]) / "data").glob("cifar10-test-*.pt"))
    assert len(files) == 1 and not list(files[0].parent.glob("*.tmp"))

    calls = []
    real = archives.decode_images
    monkeypatch.setattr(archives, "decode_images", lambda *a: calls.append(1) or real(*a))
    again = data.load("cifar10", "test", root=tmp_path)
    assert calls == [] and torch.equal(again.images, first.images) and again.digest == first.digest

    # change one source image: the cache must be rebuilt, not silently reused
    img = next((base / "test" / "airplane").glob("00000_*.webp"))
    _write_webp(img, _flat_image((250, 250, 250), 32))
    st_ = img.stat()
    os.utime(img, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    changed = data.load("cifar10", "test", root=tmp_path)
    assert calls == [1]
    assert changed.digest != first.digest
    assert changed.images[0].float().mean().item() == 250
    assert data.load("cifar10", "test", root=tmp_path, cache=False).digest == changed.digest


def test_tar_change_invalidates(tmp_path):
    base = make_cifar10_webp(tmp_path / "src")
    tar = _tar(base, tmp_path / "cifar10-webp.tar.gz")
    a = data.load("cifar10", "train", root=tmp_path)
    _write_webp(base / "train" / "cat" / "00009_cat.webp", _flat_image(_colour(0, 3), 32))  # a new class
    time.sleep(0.01)
    _tar(base, tar)
    b = data.load("cifar10", "train", root=tmp_path)
    assert len(b) == len(a) + 1 and b.labels[-1].item() == 3 and 3 not in a.labels.tolist()


def test_an_old_version_of_the_same_source_is_pruned(tmp_path):
    """A changed source (same path, new mtime) leaves one cache file, not one per version; a cache of
    another source (another folder) is kept."""
    tar = _tar(make_cifar10_webp(tmp_path / "src"), tmp_path / "cifar10-webp.tar.gz")
    other = tmp_path / "other"
    make_cifar10_webp(other)
    data.load("cifar10", "test", root=tmp_path)
    data.load("cifar10", "test", root=other)
    cache = Path(os.environ["FLATNB_CACHE"]) / "data"
    assert len(list(cache.glob("cifar10-test-*.pt"))) == 2
    st_ = tar.stat()
    os.utime(tar, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # the same archive copied again
    data.load("cifar10", "test", root=tmp_path)
    files = list(cache.glob("cifar10-test-*.pt"))
    assert len(files) == 2
    sources = {torch.load(f, weights_only=True)["source"] for f in files}
    assert sources == {str(data.find_source("cifar10", tmp_path, False).path),
                       str(data.find_source("cifar10", other, False).path)}


def test_a_full_disk_costs_the_cache_not_the_data(tmp_path, monkeypatch):
    """ENOSPC while caching: a warning that names the cause and the fix, the decoded data all the same,
    no temp file left behind."""
    import errno

    from flatnb import runtime

    make_cifar10_webp(tmp_path)
    expected = data.load("cifar10", "test", root=tmp_path, cache=False)

    def full(obj, f):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.torch, "save", full)
    with pytest.warns(RuntimeWarning, match="no space left on the device.*FLATNB_CACHE"):
        ds = data.load("cifar10", "test", root=tmp_path)
    assert torch.equal(ds.images, expected.images) and ds.digest == expected.digest
    cache = Path(os.environ["FLATNB_CACHE"]) / "data"
    assert list(cache.iterdir()) == []


def test_atomic_save_names_a_full_disk_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    from flatnb import runtime

    path = tmp_path / "x.pt"
    runtime.atomic_save({"a": 1}, path)

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("unexpected pos 4288 vs 4182") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.torch, "save", full)
    with pytest.raises(OSError, match="no space left on the device while writing .*x.pt.*FLATNB_CACHE") as e:
        runtime.atomic_save({"a": 2}, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    monkeypatch.setattr(runtime.torch, "save", lambda obj, f: (_ for _ in ()).throw(ValueError("not a disk problem")))
    with pytest.raises(ValueError, match="not a disk problem"):  # other errors pass through unchanged
        runtime.atomic_save({"a": 3}, path)


def test_cache_with_changed_pixels_is_rebuilt(tmp_path):
    """Same size, same keys, one pixel changed: the stored digest no longer matches, so decode again."""
    make_cifar10_webp(tmp_path)
    first = data.load("cifar10", "test", root=tmp_path)
    (path,) = (Path(os.environ["FLATNB_CACHE"]) / "data").glob("cifar10-test-*.pt")
    blob = bytearray(path.read_bytes())
    size = len(blob)
    at = blob.find(first.images.numpy().tobytes())  # the stored pixel buffer, uncompressed
    assert at > 0
    blob[at + 100] ^= 0xFF  # one pixel, in place: same size, still a valid file
    path.write_bytes(bytes(blob))
    assert not torch.equal(torch.load(path, weights_only=True)["images"], first.images)
    with pytest.warns(RuntimeWarning, match="do not match its stored digest") as w:
        again = data.load("cifar10", "test", root=tmp_path)
    assert str(path) in str(w[0].message)
    assert torch.equal(again.images, first.images) and again.digest == first.digest
    assert torch.equal(torch.load(path, weights_only=True)["images"], first.images)  # cache repaired
    path.write_bytes(path.read_bytes()[: size // 2])  # truncated cache: also rebuilt, with a warning
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert data.load("cifar10", "test", root=tmp_path).digest == first.digest


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_truncated_archive_names_the_archive_and_the_fix(tmp_path, kind):
    (tmp_path / "root").mkdir()
    if kind == "tar.gz":
        arch = _tar(make_cifar10_webp(tmp_path / "src"), tmp_path / "root" / "cifar10-webp.tar.gz")
        name = "cifar10"
    else:
        base = make_tiny(tmp_path / "src")
        arch = tmp_path / "root" / "tiny-imagenet-200.zip"
        with zipfile.ZipFile(arch, "w") as zf:
            for p in sorted(base.rglob("*")):
                zf.write(p, p.relative_to(base.parent).as_posix())
        name = "tinyimagenet"
    blob = arch.read_bytes()
    arch.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        data.load(name, "train", root=tmp_path / "root")
    assert str(arch) in str(e.value) and "download" in str(e.value)


def test_torchvision_pickles_are_preferred_and_described(tmp_path):
    make_cifar10_webp(tmp_path)  # the lossless WebP copy ...
    assert data.source_description("cifar10", tmp_path) == (
        "CIFAR-10, original (lossless WebP of torchvision's images, cifar10; SHA-256 checked)")
    webp = data.load("cifar10", "train", root=tmp_path)
    assert webp.source.startswith("CIFAR-10, original (lossless WebP") and len(webp) == 9
    base = tmp_path / "cifar-10-batches-py"  # ... and torchvision's own download beside it: that one is read
    rng = np.random.default_rng(3)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(base / f, {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]})
    _write_pickle(base / "batches.meta", {"label_names": CLASSES10})
    assert data.source_description("cifar10", tmp_path) == "CIFAR-10, original (torchvision's cifar-10-batches-py)"
    orig = data.load("cifar10", "train", root=tmp_path)
    assert len(orig) == 10 and orig.source == "CIFAR-10, original (torchvision's cifar-10-batches-py)"
    assert data.load("cifar10", "train", root=tmp_path).source == orig.source  # from the cache
    assert data.subset(orig, n=3).source == orig.source


# ----------------------------------------------------------------------------- subsets and batches

def _toy(n=40, k=4, size=8):
    g = torch.Generator().manual_seed(0)
    return data.Dataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.arange(n) % k, [f"c{i}" for i in range(k)], "toy")


def test_subset():
    ds = _toy()
    s = data.subset(ds, n_per_class=3, seed=1)
    assert torch.bincount(s.labels).tolist() == [3, 3, 3, 3]
    assert torch.equal(s.images, data.subset(ds, n_per_class=3, seed=1).images)
    assert not torch.equal(s.images, data.subset(ds, n_per_class=3, seed=2).images)
    r = data.subset(ds, n=7, seed=0)
    assert len(r) == 7 and r.digest != ds.digest
    # every subset image is one of the originals with its own label
    for img, lab in zip(r.images, r.labels):
        match = (ds.images == img).flatten(1).all(1).nonzero().flatten()
        assert ds.labels[match[0]] == lab
    c = data.subset(ds, num_classes=2)
    assert c.classes == ["c0", "c1"] and set(c.labels.tolist()) == {0, 1} and len(c) == 20
    with pytest.raises(ValueError):
        data.subset(ds, n_per_class=11)
    with pytest.raises(ValueError):
        data.subset(ds, n=3, n_per_class=3)
    with pytest.raises(ValueError, match="empty"):
        data.subset(ds, n_per_class=0)


def test_empty_dataset_is_rejected():
    empty = data.Dataset(torch.zeros((0, 3, 8, 8), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="empty"):
        data.Loader(empty, 4)
    with pytest.raises(ValueError, match="empty"):
        list(data.batches(empty, 4))
    with pytest.raises(ValueError, match="empty"):
        data.subset(empty)


def test_loader_epoch_covers_everything():
    ds = _toy(n=37)
    seen = []
    for x, y in data.batches(ds, 10, "cpu", shuffle=True, seed=3):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        seen.append(y)
    ys = torch.cat(seen)
    assert len(ys) == 37 and torch.equal(ys.sort().values, ds.labels.sort().values)
    xs = torch.cat([x for x, _ in data.batches(ds, 10, "cpu")])
    assert torch.equal(xs, ds.images.float() / 255)
    assert len(data.Loader(ds, 10, drop_last=True)) == 3


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), pad=st.integers(1, 4))
def test_augment_is_a_shifted_flipped_window(seed, pad):
    """Each augmented image equals some crop of the zero-padded input, possibly mirrored."""
    x = torch.rand(6, 3, 8, 8)
    out = data.augment_batch(x, torch.Generator().manual_seed(seed), pad=pad)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(len(x)):
        windows = [xp[i, :, dy:dy + 8, dx:dx + 8] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def _reflect_index(i: int, n: int) -> int:
    """Index into a length-n axis of position i of its mirror-padded version (edge not repeated)."""
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), pad=st.integers(1, 3))
def test_reflect_augment_is_a_window_of_the_mirrored_image(seed, pad):
    """airbench's translation: each image is a window of the image mirrored at its borders (built here
    from index arithmetic, not torch's padding), possibly flipped; and no black border appears."""
    x = torch.rand(6, 3, 8, 8) + 0.1
    out = data.augment_batch(x, torch.Generator().manual_seed(seed), pad=pad, mode="reflect")
    idx = torch.tensor([_reflect_index(i, 8) for i in range(-pad, 8 + pad)])
    xp = x[:, :, idx][:, :, :, idx]
    for i in range(len(x)):
        windows = [xp[i, :, dy:dy + 8, dx:dx + 8] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert out.min() > 0


def test_augment_mode_and_the_configs_crop_reach_the_loader():
    with pytest.raises(ValueError, match="mode"):
        data.augment_batch(torch.rand(2, 3, 8, 8), torch.Generator(), mode="wrap")
    from flatnb.training import train as T
    with pytest.raises(ValueError, match="crop_mode"):
        T.TrainConfig(crop_mode="mirror")
    quick = T.config_for("main", "cifar10", "standard", "quick")
    assert (quick.crop_pad, quick.crop_mode) == (2, "reflect")  # airbench's translation for FastNet
    paper = T.config_for("resnet18", "cifar10", "standard", "full")
    assert (paper.crop_pad, paper.crop_mode) == (4, "zeros")  # the paper's crop
    # the key of a config at the old defaults is unchanged (old checkpoints stay valid)
    assert T.TrainConfig().key() == T.TrainConfig(crop_pad=4, crop_mode="zeros").key()
    assert T.TrainConfig().key() != T.TrainConfig(crop_pad=2).key()


def test_augmentation_deterministic_under_seed():
    ds = _toy(n=64, size=32)
    run = lambda seed, epoch: [x for x, _ in data.batches(ds, 16, "cpu", shuffle=True, augment=True,
                                                           seed=seed, epoch=epoch)]
    a, b = run(5, 0), run(5, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, run(6, 0)))
    assert not all(torch.equal(u, v) for u, v in zip(a, run(5, 1)))
    # augmentation really changes the pixels (not a no-op)
    plain = [x for x, _ in data.batches(ds, 16, "cpu", shuffle=True, seed=5)]
    assert not all(torch.equal(u, v) for u, v in zip(a, plain))


# ----------------------------------------------------------------------------- real data

def _real_root():
    try:
        return data.data_root()
    except FileNotFoundError:
        return None


README_SHA256 = {  # copied from ../shared/data/README.md, not from flatnb
    "train": ("47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
              "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f"),
    "test": ("f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
             "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb"),
}


@pytest.mark.parametrize("name,split,n,k,size", [
    ("cifar10", "test", 10_000, 10, 32), ("cifar10", "train", 50_000, 10, 32),
    ("tinyimagenet", "test", 10_000, 200, 64), ("tinyimagenet", "train", 100_000, 200, 64),
])
def test_real_data(caller_cache, name, split, n, k, size):
    root = _real_root()
    if root is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no data folder: set FLATNB_DATA to the folder holding the shared tarballs")
    try:
        ds = data.load(name, split, root=root)
    except FileNotFoundError as e:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{name} is not present under {root}: {e}")
    assert ds.images.shape == (n, 3, size, size) and len(ds.classes) == k
    assert torch.bincount(ds.labels, minlength=k).tolist() == [n // k] * k
    assert 60 < ds.images[:1000].float().mean().item() < 190  # real photos, not blank
    if name == "cifar10":  # the original CIFAR-10: the SHA-256 of ../shared/data/README.md, hashed here by hand
        import hashlib

        hwc = ds.images.permute(0, 2, 3, 1).contiguous().numpy()
        assert hashlib.sha256(hwc.tobytes()).hexdigest() == README_SHA256[split][0]
        assert hashlib.sha256(ds.labels.numpy().astype(np.int64).tobytes()).hexdigest() == README_SHA256[split][1]
    t = time.perf_counter()
    again = data.load(name, split, root=root)
    assert again.digest == ds.digest
    print(f"{name} {split}: cached load {time.perf_counter() - t:.3f} s")


def test_split_gives_disjoint_seeded_sorted_pieces_with_stable_digests():
    ds = data.Dataset(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1), torch.arange(20) % 3, ["a", "b", "c"],
                      "d0", "src")
    a, b, c = data.split(ds, (5, 4, 3), seed=7)
    ia, ib, ic = (set(x.images.view(-1).tolist()) for x in (a, b, c))
    assert (len(ia), len(ib), len(ic)) == (5, 4, 3) and not (ia & ib or ia & ic or ib & ic)
    assert a.images.view(-1).tolist() == sorted(ia) and a.labels.tolist() == [i % 3 for i in sorted(ia)]
    # the same pieces as one seeded permutation cut in order (the atlas's probe, chapter 11)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    assert a.images.view(-1).tolist() == order[:5].sort().values.tolist()
    assert b.images.view(-1).tolist() == order[5:9].sort().values.tolist()
    assert a.digest == "d0|split|7|5" and data.split(ds, (5,), seed=7, tag="atlas")[0].digest == "d0|atlas|7|5"
    assert a.source == "src" and a.classes == ds.classes
    assert data.split(ds, (5, 4), seed=8)[0].images.view(-1).tolist() != a.images.view(-1).tolist()
    for bad in ((15, 6), (0, 3), ()):
        with pytest.raises(ValueError, match="sizes must be positive"):
            data.split(ds, bad)
