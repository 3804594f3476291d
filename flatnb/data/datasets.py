"""Datasets as decoded uint8 tensors, cached once; device-side batching and augmentation.

Sources (found under :func:`data_root`):

* ``cifar10``: torchvision's python-pickle folder ``cifar-10-batches-py`` (what torchvision and
  Colab download), else the same images as lossless WebP, ``cifar10/{train,test}/<class>/<index>_<name>.webp``
  in a ``cifar10-webp.tar.gz``/``.tar`` or a folder (``<index>`` is the position in torchvision's
  order). Either way the decoded arrays are checked against the SHA-256 values of
  :data:`CIFAR10_SHA256` (the data README's), so the book always computes on the original CIFAR-10.
* ``cifar100``: torchvision's pickle folder ``cifar-100-python``.
* ``tinyimagenet``: ``tiny-imagenet-200`` as ``.tar.gz``/``.tar``/``.zip`` or a
  folder; ``"test"`` is the labelled validation split (``val/val_annotations.txt``).

With ``download=True`` a missing dataset is fetched (CIFAR through torchvision,
Tiny ImageNet from its official URL with a checksum; see :mod:`flatnb.data.download`)
into the data folder, which is created when missing.

Every split is decoded once into ``cache_dir()/data/<name>-<split>-<key>.pt``; the
key hashes the source's identity (path, size and mtime of the archive, or of every
file in a folder), so a changed source is decoded again and never silently reused.
A cache file is checked against its stored content digest whenever it is read (a
BLAKE2b of the payload bytes, no re-decode) and decoded again on a mismatch.
Pixels stay uint8 in the cache and come out of :class:`Loader` as floats in [0, 1]:
models normalise inside themselves, so attacks work in [0, 1].
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from flatnb.config.train_config import DATASETS
from flatnb.data import archives
from flatnb.data.download import HOW_TO_SUPPLY, Source, data_root, find_source, root_for, source_key
from flatnb.runtime import atomic_save, cache_dir

SPLITS = ("train", "test")
_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tinyimagenet": 64}
#: per-channel mean/std of the training sets, used by the models' internal normalisation
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
class Dataset(NamedTuple):
    """Decoded split: ``images`` uint8 (N, 3, H, W) on the CPU, ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    digest: str = ""  # content hash of images+labels+classes (identity for checkpoints)
    source: str = ""  # what the pixels are, e.g. "CIFAR-10, original (torchvision)"; see source_description

    def __len__(self) -> int:
        return int(self.labels.shape[0])


#: torchvision's CIFAR-10 classes; a label is the position of its class here
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: SHA-256 of the decoded CIFAR-10 splits in torchvision's order: (uint8 pixels as (N, 32, 32, 3), int64 labels).
#: From ../shared/data/README.md; torchvision's pickles and the lossless WebP archive both decode to these.
CIFAR10_SHA256 = {
    "train": ("47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
              "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f"),
    "test": ("f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
             "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb"),
}


def array_sha256(images: torch.Tensor, labels: torch.Tensor) -> tuple[str, str]:
    """SHA-256 of a split as the data README states them: uint8 pixels in HWC order, int64 labels."""
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    return (hashlib.sha256(hwc.tobytes()).hexdigest(),
            hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest())


def check_cifar10(images: torch.Tensor, labels: torch.Tensor, split: str, where: Path) -> None:
    """Raise ``ValueError`` naming ``where`` unless the split is exactly torchvision's CIFAR-10."""
    want = CIFAR10_SHA256.get(split)
    if want is None:
        return
    have = array_sha256(images, labels)
    if have != want:
        what = "pixels" if have[0] != want[0] else "labels"
        raise ValueError(
            f"CIFAR-10 {split} from {where} is not the original dataset: the SHA-256 of its {what} is "
            f"{have[0 if what == 'pixels' else 1]}, expected {want[0 if what == 'pixels' else 1]} ({len(labels)} images "
            f"read). To fix: replace {where} with an intact copy (cifar10-webp.tar.gz of the shared data, or "
            f"torchvision's cifar-10-batches-py via data.load(..., download=True))")


def _load_webp(src: Source, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """CIFAR-10 as lossless WebP: ``cifar10/<split>/<class>/<index>_<name>.webp`` in torchvision's order."""
    items: dict[int, tuple[str, int, bytes]] = {}

    def want(rel: str) -> bool:
        s = archives.strip_to(rel, split)
        return s is not None and s.count("/") == 2 and rel.lower().endswith(".webp")

    for rel, b in archives.iter_files(src.path, want):
        _, cls, base = archives.strip_to(rel, split).split("/")
        head = base.split("_", 1)[0]
        if not head.isdigit() or cls not in CIFAR10_CLASSES:
            raise ValueError(f"{rel!r} in {src.path} does not follow the layout <split>/<class>/<index>_<name>.webp "
                             f"with a class of {CIFAR10_CLASSES}. To fix: {HOW_TO_SUPPLY}")
        i = int(head)
        if i in items:
            raise ValueError(f"{rel!r} and {items[i][0]!r} in {src.path} share the index {i}. To fix: {HOW_TO_SUPPLY}")
        items[i] = (rel, CIFAR10_CLASSES.index(cls), b)
    if not items:
        raise FileNotFoundError(f"no images under '{split}/<class>/*.webp' in {src.path}. To fix: {HOW_TO_SUPPLY}")
    missing = sorted(set(range(len(items))) - set(items))
    if missing:
        raise ValueError(f"{src.path} {split}: the image indices are not 0..{len(items) - 1} (first gap at "
                         f"{missing[0]}): the archive is incomplete. To fix: replace it with a complete copy")
    order = [items[i] for i in range(len(items))]
    labels = torch.tensor([c for _, c, _ in order], dtype=torch.int64)
    images = archives.decode_images([(r, b) for r, _, b in order], 32, src.path)
    return images, labels, list(CIFAR10_CLASSES)


def _load_pickle(name: str, src: Source, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """torchvision's CIFAR python-pickle folders."""
    def read(fname: str) -> dict:
        p = src.path / fname
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing from the {name} pickle folder. To fix: {HOW_TO_SUPPLY}")
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


def _load_tiny(src: Source, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Tiny ImageNet: ``train/<wnid>/images/*.JPEG``; test = ``val/images`` + ``val_annotations.txt``."""
    texts: dict[str, bytes] = {}
    imgs: list[tuple[str, bytes]] = []

    def want(rel: str) -> bool:
        base = rel.rsplit("/", 1)[-1]
        if base in ("wnids.txt", "val_annotations.txt"):
            return True
        s = archives.strip_to(rel, "train" if split == "train" else "val")
        if s is None or not rel.lower().endswith(archives.IMAGE_EXTENSIONS):
            return False
        parts = s.split("/")
        return (len(parts) == 4 and parts[2] == "images") if split == "train" else (len(parts) == 3 and parts[1] == "images")

    for rel, b in archives.iter_files(src.path, want):
        base = rel.rsplit("/", 1)[-1]
        if base in ("wnids.txt", "val_annotations.txt"):
            texts[base] = b
        else:
            imgs.append((rel, b))
    if "wnids.txt" not in texts:
        raise FileNotFoundError(f"wnids.txt missing in {src.path}: not a Tiny ImageNet layout. To fix: {HOW_TO_SUPPLY}")
    classes = sorted(texts["wnids.txt"].decode().split())
    idx = {c: i for i, c in enumerate(classes)}
    if split == "train":
        lab = [idx[archives.strip_to(r, "train").split("/")[1]] for r, _ in imgs]
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
    return archives.decode_images(imgs, 64, src.path), labels, classes


def _digest(images: torch.Tensor, labels: torch.Tensor, classes: list) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update("\n".join(classes).encode())
    return h.hexdigest()


_TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny ImageNet-200"}


def _describe(name: str, src: Source) -> str:
    """What the pixels of ``src`` are, in one line."""
    title = _TITLE[name]
    if src.kind == "pickle-dir":
        return f"{title}, original (torchvision's {src.path.name})"
    if src.kind.startswith("webp"):
        return f"{title}, original (lossless WebP of torchvision's images, {src.path.name}; SHA-256 checked)"
    return f"{title}, cs231n release ({src.path.name}); test = its labelled validation split"


def source_description(name: str, root: str | os.PathLike | None = None) -> str:
    """Which copy of ``name`` :func:`load` reads under ``root``, e.g. ``"CIFAR-10, original (torchvision's
    cifar-10-batches-py)"``: a chapter's provenance line states it."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return _describe(name, find_source(name, data_root(root), download=False))


def download_default() -> bool:
    """Whether a missing dataset is downloaded when ``download`` is not given: in Colab, or when the
    environment sets ``FLATNB_DOWNLOAD=1`` (a reader's notebook should fetch its data; CI never does)."""
    return "google.colab" in sys.modules or os.environ.get("FLATNB_DOWNLOAD") == "1"


def load(name: str, split: str, root: str | os.PathLike | None = None, cache: bool | None = None,
         download: bool | None = None) -> Dataset:
    """Load a split as uint8 tensors, decoding the source once into the cache.

    ``name`` in ``("cifar10", "cifar100", "tinyimagenet")``; ``split`` in
    ``("train", "test")`` (Tiny ImageNet ``"test"`` is its labelled val split).
    ``cache=False`` decodes without reading or writing the cache (default: use it).
    ``download=True`` fetches a dataset that is not found (into ``root``, else
    ``$FLATNB_DATA``, else ``~/.cache/flatnb/data``, created when missing); ``None`` (default)
    means :func:`download_default` (True in Colab or with ``FLATNB_DOWNLOAD=1``).
    The returned :class:`Dataset` says in ``source`` which copy was read.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    download = download_default() if download is None else bool(download)
    src = find_source(name, root_for(root, download, name), download)
    key = source_key(src)
    path = cache_dir() / "data" / f"{name}-{split}-{key}.pt"
    if cache is not False and path.exists():
        try:
            d = torch.load(path, mmap=True, weights_only=True)
            ds = Dataset(d["images"], d["labels"], list(d["classes"]), d["digest"], d.get("description", ""))
            ok = _digest(ds.images, ds.labels, ds.classes) == ds.digest
        except Exception as e:  # unreadable cache (e.g. a crash of an old version)
            ok, why = False, f"it cannot be read ({type(e).__name__}: {e})"
        else:
            why = "its pixels or labels do not match its stored digest"
        if ok:
            return ds if ds.source else Dataset(*ds[:4], _describe(name, src))  # (_replace trips on __len__)
        warnings.warn(f"data cache {path} is damaged: {why}; decoding {src.path} again", RuntimeWarning,
                      stacklevel=2)
    if src.kind in ("webp-tar", "webp-dir"):
        images, labels, classes = _load_webp(src, split)
    elif src.kind == "pickle-dir":
        images, labels, classes = _load_pickle(name, src, split)
    else:
        images, labels, classes = _load_tiny(src, split)
    if name == "cifar10":
        check_cifar10(images, labels, split, src.path)
    ds = Dataset(images, labels, classes, _digest(images, labels, classes), _describe(name, src))
    if cache is not False:
        try:
            atomic_save({"images": images, "labels": labels, "classes": classes, "digest": ds.digest,
                          "source": str(src.path), "description": ds.source}, path)
        except OSError as e:  # the cache is only a shortcut: a full disk costs a decode next time, not this run
            warnings.warn(f"{name} {split} is not cached ({e}); it will be decoded again next time", RuntimeWarning,
                          stacklevel=2)
        else:
            _prune_stale(path, name, split, src)
    return ds


def _prune_stale(path: Path, name: str, split: str, src: Source) -> None:
    """Delete the cache files of earlier versions of the same source file or folder (same path, other
    size or mtime): each would otherwise keep up to 1.2 GB (Tiny ImageNet's train split) for nothing."""
    for old in path.parent.glob(f"{name}-{split}-*.pt"):
        if old == path:
            continue
        try:
            same = torch.load(old, mmap=True, weights_only=True).get("source") == str(src.path)
        except Exception:  # unreadable: a damaged file of an old version
            same = True
        if same:
            old.unlink(missing_ok=True)


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
    if len(keep) == 0:
        raise ValueError(f"the subset is empty (dataset of {len(ds)} samples, n_per_class={n_per_class}, n={n}, "
                         f"num_classes={num_classes}); ask for at least one sample")
    tag = f"{ds.digest}|{n_per_class}|{n}|{seed}|{num_classes}"
    return Dataset(ds.images[keep], ds.labels[keep], classes, hashlib.blake2b(tag.encode(), digest_size=16).hexdigest(),
                   ds.source)


def split(ds: Dataset, sizes, seed: int = 0, tag: str = "split") -> list[Dataset]:
    """Disjoint seeded subsets of ``ds``, one per entry of ``sizes`` (e.g. test, held-out and attack images).

    One seeded permutation of ``ds`` is cut into consecutive pieces of the given sizes; each piece keeps the
    dataset's order (its indices sorted). ``tag`` enters each piece's digest
    (``f"{ds.digest}|{tag}|{seed}|{size}"``), so callers that cache by digest keep their keys.
    """
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1 or sum(sizes) > len(ds):
        raise ValueError(f"sizes must be positive and sum to at most the {len(ds)} samples, got {sizes}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for n in sizes:
        idx = order[start:start + n].sort().values
        out.append(Dataset(ds.images[idx], ds.labels[idx], ds.classes, f"{ds.digest}|{tag}|{seed}|{n}", ds.source))
        start += n
    return out


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, mode: str = "zeros") -> torch.Tensor:
    """Random crop with padding ``pad`` and horizontal flip, on ``x``'s device.

    ``mode="zeros"`` pads with black (the paper's crop), ``"reflect"`` mirrors the border
    (airbench's translation, which keeps the image statistics of the border). The random
    numbers come from a CPU ``generator`` so the result is the same on every device for a given seed.
    """
    if mode not in ("zeros", "reflect"):
        raise ValueError(f"mode must be 'zeros' or 'reflect', got {mode!r}")
    n, c, h, w = x.shape
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device, non_blocking=True)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device, non_blocking=True)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="constant" if mode == "zeros" else "reflect")
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
                 augment: bool = False, seed: int = 0, drop_last: bool = False, pad: int = 4, pad_mode: str = "zeros"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(ds) == 0:
            raise ValueError("the dataset is empty (0 samples): nothing to iterate; check the split or subset it came from")
        self.device = torch.device(device)
        self.images = ds.images.to(self.device) if self.device.type == "cuda" else ds.images
        self.labels = ds.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment, self.seed, self.drop_last = batch_size, shuffle, augment, seed, drop_last
        self.pad, self.pad_mode = pad, pad_mode
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
                x = augment_batch(x, g, self.pad, self.pad_mode)
            yield x, self.labels[idx_d]


def batches(ds: Dataset, batch_size: int, device: torch.device | str = "cpu", shuffle: bool = False,
            augment: bool = False, seed: int = 0, drop_last: bool = False, epoch: int = 0):
    """One epoch of ``(x in [0,1] on device, y)`` batches; see :class:`Loader`."""
    loader = Loader(ds, batch_size, device, shuffle, augment, seed, drop_last)
    loader.set_epoch(epoch)
    return iter(loader)
