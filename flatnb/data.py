"""Datasets as decoded uint8 tensors, cached once; device-side batching and augmentation.

Sources (found under :func:`data_root`):

* ``cifar10``: the JPEG layout ``[cifar10-jpeg/]{train,test}/<class>/*.jpg`` as a
  ``cifar10-jpeg.tar.gz``/``.tar`` or a folder, or torchvision's python-pickle
  folder ``cifar-10-batches-py`` (downloaded by torchvision when ``download=True``).
* ``cifar100``: torchvision's pickle folder ``cifar-100-python`` (or download).
* ``tinyimagenet``: ``tiny-imagenet-200`` as ``.tar.gz``/``.tar``/``.zip`` or a
  folder; ``"test"`` is the labelled validation split (``val/val_annotations.txt``).

Every split is decoded once into ``cache_dir()/data/<name>-<split>-<key>.pt``; the
key hashes the source's identity (path, size and mtime of the archive, or of every
file in a folder), so a changed source is decoded again and never silently reused.
Pixels stay uint8 in the cache and come out of :class:`Loader` as floats in [0, 1]:
models normalise inside themselves, so attacks work in [0, 1].
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from flatnb.runtime import atomic_save, cache_dir

DATASETS = ("cifar10", "cifar100", "tinyimagenet")
SPLITS = ("train", "test")
_CACHE_VERSION = 1
_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tinyimagenet": 64}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200}
#: per-channel mean/std of the training sets, used by the models' internal normalisation
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
_HOW = (
    "set FLATNB_DATA=/path/to/folder holding cifar10-jpeg.tar.gz, tiny-imagenet-200.tar.gz "
    "(or .zip / extracted folders) or cifar-100-python/, or pass root=...; "
    "CIFAR-10/100 can also be fetched by torchvision with download=True"
)


class Dataset(NamedTuple):
    """Decoded split: ``images`` uint8 (N, 3, H, W) on the CPU, ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    digest: str = ""  # content hash of images+labels+classes (identity for checkpoints)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- roots

def _default_roots() -> list[Path]:
    cwd = Path.cwd()
    return [cwd / "data", cwd.parent / "data", cwd.parent / "shared" / "data",
            cwd.parent.parent / "shared" / "data", Path.home() / ".cache" / "flatnb" / "data"]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$FLATNB_DATA``, else the first existing default.

    Defaults tried in order: ``./data``, ``../data``, ``../shared/data``,
    ``../../shared/data``, ``~/.cache/flatnb/data``. Raises ``FileNotFoundError``
    listing where it looked and how to provide the data.
    """
    if root is not None:
        candidates, origin = [Path(root).expanduser()], "root argument"
    elif os.environ.get("FLATNB_DATA"):
        candidates, origin = [Path(os.environ["FLATNB_DATA"]).expanduser()], "FLATNB_DATA"
    else:
        candidates, origin = _default_roots(), "defaults (FLATNB_DATA is not set)"
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no data folder found (from {origin}); looked in: {looked}. To fix: {_HOW}")


# --------------------------------------------------------------------------- sources

@dataclass
class _Source:
    kind: str  # "jpeg-tar" | "jpeg-dir" | "pickle-dir" | "tiny-tar" | "tiny-zip" | "tiny-dir"
    path: Path
    prefix: str = ""  # folder inside an archive that holds train/ and test/ (or val/)
    extra: dict = field(default_factory=dict)


def _find_source(name: str, root: Path, download: bool) -> _Source:
    looked: list[Path] = []

    def exists(p: Path) -> bool:
        looked.append(p)
        return p.exists()

    if name == "cifar10":
        for stem in ("cifar10-jpeg", "cifar10"):
            for ext in (".tar.gz", ".tgz", ".tar"):
                if exists(root / f"{stem}{ext}"):
                    return _Source("jpeg-tar", root / f"{stem}{ext}")
            if exists(root / stem / "train") and (root / stem / "test").is_dir():
                return _Source("jpeg-dir", root / stem)
        if exists(root / "train") and (root / "test").is_dir() and (root / "train" / "airplane").is_dir():
            return _Source("jpeg-dir", root)
        if exists(root / "cifar-10-batches-py" / "batches.meta"):
            return _Source("pickle-dir", root / "cifar-10-batches-py")
    elif name == "cifar100":
        if exists(root / "cifar-100-python" / "meta"):
            return _Source("pickle-dir", root / "cifar-100-python")
    elif name == "tinyimagenet":
        for ext, kind in ((".tar.gz", "tiny-tar"), (".tgz", "tiny-tar"), (".tar", "tiny-tar"), (".zip", "tiny-zip")):
            if exists(root / f"tiny-imagenet-200{ext}"):
                return _Source(kind, root / f"tiny-imagenet-200{ext}")
        if exists(root / "tiny-imagenet-200" / "wnids.txt"):
            return _Source("tiny-dir", root / "tiny-imagenet-200")
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")

    if download and name in ("cifar10", "cifar100"):
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
        return _find_source(name, root, download=False)
    raise FileNotFoundError(
        f"{name} not found under {root}; looked for: " + ", ".join(str(p) for p in looked) + f". To fix: {_HOW}"
    )


def _source_key(src: _Source) -> str:
    """Cheap identity of the source: size+mtime of the archive, or of every file of a folder."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{src.kind}|{src.path.resolve()}".encode())
    if src.path.is_file():
        st = src.path.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        for dirpath, dirnames, filenames in os.walk(src.path):
            dirnames.sort()
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                st = os.stat(p)
                h.update(f"|{os.path.relpath(p, src.path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- archive walking

def _iter_files(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(relative path with '/', bytes) for every wanted file of a tarball, zip or folder."""
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for f in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/")
                if want(rel):
                    yield rel, Path(dirpath, f).read_bytes()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir() and want(info.filename):
                    yield info.filename, zf.read(info)
    else:
        # streaming mode: one sequential pass through the (gzipped) tar, no seeking
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if m.isfile() and want(m.name):
                    f = tf.extractfile(m)
                    yield m.name, f.read()


def _strip(rel: str, marker: str) -> str | None:
    """Part of ``rel`` from the path component ``marker`` on (handles any top folder)."""
    parts = rel.split("/")
    if marker in parts:
        i = parts.index(marker)
        return "/".join(parts[i:])
    return None


_IMG_EXT = (".jpg", ".jpeg", ".png")


def _decode(items: list[tuple[str, bytes]], size: int, where: Path) -> torch.Tensor:
    """Decode encoded images to uint8 (N, 3, size, size); a bad file raises naming it."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return _decode_impl(items, size, where)


def _decode_impl(items: list[tuple[str, bytes]], size: int, where: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    out = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    chunk = 2048
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for _, b in part]
        try:
            if all(n.lower().endswith((".jpg", ".jpeg")) for n, _ in part):
                imgs = decode_jpeg(datas, mode=ImageReadMode.RGB)
            else:
                imgs = [decode_image(d, mode=ImageReadMode.RGB) for d in datas]
        except Exception:
            imgs = None
        if imgs is None:  # find the culprit one by one so the error names it
            imgs = []
            for (n, _), d in zip(part, datas):
                try:
                    imgs.append(decode_image(d, mode=ImageReadMode.RGB))
                except Exception as e:
                    raise ValueError(f"corrupt or unreadable image {n!r} in {where}: {e}. "
                                     "Replace the file (or re-download the dataset).") from e
        for j, ((n, _), img) in enumerate(zip(part, imgs)):
            if tuple(img.shape) != (3, size, size):
                raise ValueError(f"image {n!r} in {where} has shape {tuple(img.shape)}, expected (3, {size}, {size})")
            out[start + j] = img
    return out


def _load_jpeg_classes(src: _Source, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """CIFAR-10 JPEG layout: ``<split>/<class>/<file>``."""
    items: list[tuple[str, str, bytes]] = []

    def want(rel: str) -> bool:
        s = _strip(rel, split)
        return s is not None and s.count("/") == 2 and rel.lower().endswith(_IMG_EXT)

    for rel, b in _iter_files(src.path, want):
        s = _strip(rel, split).split("/")
        items.append((s[1], rel, b))
    if not items:
        raise FileNotFoundError(f"no images under '{split}/<class>/' in {src.path}. To fix: {_HOW}")
    items.sort(key=lambda t: (t[0], t[1]))
    classes = sorted({c for c, _, _ in items})
    idx = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([idx[c] for c, _, _ in items], dtype=torch.int64)
    images = _decode([(r, b) for _, r, b in items], size, src.path)
    return images, labels, classes


def _load_pickle(name: str, src: _Source, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """torchvision's CIFAR python-pickle folders."""
    def read(fname: str) -> dict:
        p = src.path / fname
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing from the {name} pickle folder. To fix: {_HOW}")
        with open(p, "rb") as f:
            try:
                return pickle.load(f, encoding="latin1")
            except Exception as e:
                raise ValueError(f"corrupt pickle file {p}: {e}") from e

    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        classes = list(read("batches.meta")["label_names"])
        key = "labels"
    else:
        files = ["train" if split == "train" else "test"]
        classes = list(read("meta")["fine_label_names"])
        key = "fine_labels"
    data, labels = [], []
    for fname in files:
        d = read(fname)
        data.append(torch.as_tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.extend(d[key])
    return torch.cat(data).contiguous(), torch.tensor(labels, dtype=torch.int64), classes


def _load_tiny(src: _Source, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Tiny ImageNet: ``train/<wnid>/images/*.JPEG``; test = ``val/images`` + ``val_annotations.txt``."""
    texts: dict[str, bytes] = {}
    imgs: list[tuple[str, bytes]] = []

    def want(rel: str) -> bool:
        base = rel.rsplit("/", 1)[-1]
        if base in ("wnids.txt", "val_annotations.txt"):
            return True
        s = _strip(rel, "train" if split == "train" else "val")
        if s is None or not rel.lower().endswith(_IMG_EXT):
            return False
        parts = s.split("/")
        return (len(parts) == 4 and parts[2] == "images") if split == "train" else (len(parts) == 3 and parts[1] == "images")

    for rel, b in _iter_files(src.path, want):
        base = rel.rsplit("/", 1)[-1]
        if base in ("wnids.txt", "val_annotations.txt"):
            texts[base] = b
        else:
            imgs.append((rel, b))
    if "wnids.txt" not in texts:
        raise FileNotFoundError(f"wnids.txt missing in {src.path}: not a Tiny ImageNet layout. To fix: {_HOW}")
    classes = sorted(texts["wnids.txt"].decode().split())
    idx = {c: i for i, c in enumerate(classes)}
    if split == "train":
        lab = [idx[_strip(r, "train").split("/")[1]] for r, _ in imgs]
    else:
        if "val_annotations.txt" not in texts:
            raise FileNotFoundError(f"val/val_annotations.txt missing in {src.path}; it holds the validation labels")
        ann = {}
        for line in texts["val_annotations.txt"].decode().splitlines():
            f = line.split("\t")
            if len(f) >= 2:
                ann[f[0]] = f[1]
        lab = []
        for r, _ in imgs:
            base = r.rsplit("/", 1)[-1]
            if base not in ann:
                raise ValueError(f"{r!r} in {src.path} has no line in val_annotations.txt")
            lab.append(idx[ann[base]])
    if not imgs:
        raise FileNotFoundError(f"no {split} images found in {src.path}")
    order = sorted(range(len(imgs)), key=lambda i: (lab[i], imgs[i][0]))
    imgs = [imgs[i] for i in order]
    labels = torch.tensor([lab[i] for i in order], dtype=torch.int64)
    return _decode(imgs, 64, src.path), labels, classes


def _digest(images: torch.Tensor, labels: torch.Tensor, classes: list) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update("\n".join(classes).encode())
    return h.hexdigest()


def load(name: str, split: str, root: str | os.PathLike | None = None, cache: bool | None = None,
         download: bool = False) -> Dataset:
    """Load a split as uint8 tensors, decoding the source once into the cache.

    ``name`` in ``("cifar10", "cifar100", "tinyimagenet")``; ``split`` in
    ``("train", "test")`` (Tiny ImageNet ``"test"`` is its labelled val split).
    ``cache=False`` decodes without reading or writing the cache (default: use it).
    ``download=True`` lets torchvision fetch CIFAR when no local copy is found.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    src = _find_source(name, data_root(root), download)
    key = _source_key(src)
    path = cache_dir() / "data" / f"{name}-{split}-{key}.pt"
    if cache is not False and path.exists():
        try:
            d = torch.load(path, mmap=True, weights_only=True)
            return Dataset(d["images"], d["labels"], list(d["classes"]), d["digest"])
        except Exception:
            pass  # unreadable cache (e.g. a crash of an old version): decode again
    if src.kind in ("jpeg-tar", "jpeg-dir"):
        images, labels, classes = _load_jpeg_classes(src, split, _IMAGE_SIZE[name])
    elif src.kind == "pickle-dir":
        images, labels, classes = _load_pickle(name, src, split)
    else:
        images, labels, classes = _load_tiny(src, split)
    ds = Dataset(images, labels, classes, _digest(images, labels, classes))
    if cache is not False:
        atomic_save({"images": images, "labels": labels, "classes": classes, "digest": ds.digest,
                      "source": str(src.path)}, path)
    return ds


# --------------------------------------------------------------------------- subsets and batches

def subset(ds: Dataset, n_per_class: int | None = None, n: int | None = None, seed: int = 0,
           num_classes: int | None = None) -> Dataset:
    """A seeded subset: the first ``num_classes`` classes, then ``n_per_class`` per class or ``n`` at random.

    Keeps the original order of the selected samples; with ``num_classes`` the
    labels stay 0..num_classes-1 (those classes are the first ones).
    """
    if n_per_class is not None and n is not None:
        raise ValueError("give n_per_class or n, not both")
    g = torch.Generator().manual_seed(seed)
    keep = torch.arange(len(ds))
    classes = list(ds.classes)
    if num_classes is not None:
        if not 1 <= num_classes <= len(classes):
            raise ValueError(f"num_classes must be in 1..{len(classes)}, got {num_classes}")
        keep = keep[ds.labels < num_classes]
        classes = classes[:num_classes]
    labels = ds.labels[keep]
    if n_per_class is not None:
        picks = []
        for c in range(len(classes)):
            idx = keep[labels == c]
            if n_per_class > len(idx):
                raise ValueError(f"class {classes[c]!r} has {len(idx)} samples < n_per_class={n_per_class}")
            picks.append(idx[torch.randperm(len(idx), generator=g)[:n_per_class]])
        keep = torch.cat(picks).sort().values
    elif n is not None:
        if not 0 < n <= len(keep):
            raise ValueError(f"n must be in 1..{len(keep)}, got {n}")
        keep = keep[torch.randperm(len(keep), generator=g)[:n]].sort().values
    tag = f"{ds.digest}|{n_per_class}|{n}|{seed}|{num_classes}"
    return Dataset(ds.images[keep], ds.labels[keep], classes, hashlib.blake2b(tag.encode(), digest_size=16).hexdigest())


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and horizontal flip, on ``x``'s device.

    The random numbers come from a CPU ``generator`` so the result is the same
    on every device for a given seed.
    """
    n, c, h, w = x.shape
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device, non_blocking=True)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device, non_blocking=True)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    bidx = torch.arange(n, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


class Loader:
    """Iterates ``(x, y)`` batches on ``device``; ``x`` float32 in [0, 1].

    Each ``iter()`` is one epoch; epoch ``e`` uses seed ``seed + e`` for the
    shuffle and the augmentation, so a resumed run sees the same batches.
    On CUDA the whole uint8 set is moved to the device once.
    """

    def __init__(self, ds: Dataset, batch_size: int, device: torch.device | str = "cpu", shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = ds.images.to(self.device) if self.device.type == "cuda" else ds.images
        self.labels = ds.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment, self.seed, self.drop_last = batch_size, shuffle, augment, seed, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            idx_d = idx.to(self.device, non_blocking=True)
            x = self.images[idx_d if self.images.device == self.device else idx].to(self.device, non_blocking=True)
            x = x.float().div_(255)
            if self.augment:
                x = augment_batch(x, g)
            yield x, self.labels[idx_d]


def batches(ds: Dataset, batch_size: int, device: torch.device | str = "cpu", shuffle: bool = False,
            augment: bool = False, seed: int = 0, drop_last: bool = False, epoch: int = 0):
    """One epoch of ``(x in [0,1] on device, y)`` batches; see :class:`Loader`."""
    loader = Loader(ds, batch_size, device, shuffle, augment, seed, drop_last)
    loader.set_epoch(epoch)
    return iter(loader)
