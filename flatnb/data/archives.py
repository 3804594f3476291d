"""Reading image archives: the files of a tarball, zip or folder, and decoding them to uint8 tensors.

Used by :mod:`flatnb.data.datasets`; imports nothing from flatnb.
"""
from __future__ import annotations

import os
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def iter_files(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(relative path with '/', bytes) for every wanted file of a tarball, zip or folder.

    A truncated or corrupt archive raises ``ValueError`` naming the archive and the fix.
    """
    if path.is_dir():
        yield from _iter_dir(path, want)
        return
    try:
        yield from _iter_archive(path, want)
    except _ARCHIVE_ERRORS as e:
        raise ValueError(f"the archive {path} is truncated or corrupt ({type(e).__name__}: {e}). To fix: delete "
                         f"it and download it again (data.load(..., download=True) fetches Tiny ImageNet and "
                         f"CIFAR), or replace it with a complete copy") from e


def _iter_dir(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/")
            if want(rel):
                yield rel, Path(dirpath, f).read_bytes()


def _iter_archive(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    if zipfile.is_zipfile(path):
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


def strip_to(rel: str, marker: str) -> str | None:
    """Part of ``rel`` from the path component ``marker`` on (handles any top folder)."""
    parts = rel.split("/")
    if marker in parts:
        i = parts.index(marker)
        return "/".join(parts[i:])
    return None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def decode_images(items: list[tuple[str, bytes]], size: int, where: Path) -> torch.Tensor:
    """Decode encoded images to uint8 (N, 3, size, size); a bad file raises naming it."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return _decode_impl(items, size, where)


def _decode_impl(items: list[tuple[str, bytes]], size: int, where: Path) -> torch.Tensor:
    # heavy and rarely used: torchvision loads in about a second and decodes only on a cache miss
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg


    out = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    chunk = 2048
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for _, b in part]
        try:
            if all(n.lower().endswith((".jpg", ".jpeg")) for n, _ in part):  # Tiny ImageNet: batched
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
