"""Published weights for readers: export a trained model, load it back by path or URL, checked by SHA-256.

A Colab reader can load the weights behind a chapter instead of training them
(the models of ``walter2026flatness``, Sec. 5, take hours at paper scale):

    sha = export_weights(model, "resnet18-cifar10.pt")      # also writes resnet18-cifar10.pt.sha256
    load_weights(model, "https://.../resnet18-cifar10.pt", sha256=sha)

The file is a plain state dict (``torch.save``; loaded with ``weights_only=True``,
so a weights file cannot run code). URLs (``http://``, ``https://``, ``file://``)
are downloaded atomically into ``cache_dir()/weights/`` and reused from there.
:func:`read_checkpoint` guards the training checkpoints of :func:`flatnb.training.train.train`:
a corrupt one is moved aside with a warning instead of stopping the run.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time
import urllib.parse
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from flatnb.data.download import DownloadError, fetch, file_digest
from flatnb.runtime import atomic_save, atomic_write_text, cache_dir

_URL_SCHEMES = ("http", "https", "file")


class WeightsError(ValueError):
    """A weights file failed its SHA-256 check, could not be read, or does not fit the model."""


def export_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Save ``model``'s state dict (on the CPU) atomically to ``path``; return its SHA-256.

    Writes ``<path>.sha256`` beside it in ``sha256sum`` format, so that
    ``sha256sum -c`` and :func:`load_weights` can check the file.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    atomic_save(state, path)
    sha = file_digest(path, "sha256")
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{sha}  {path.name}\n")
    return sha


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in _URL_SCHEMES


def _local_copy(url: str, sha256: str | None) -> Path:
    """The cached download of ``url`` (fetched atomically the first time)."""
    name = Path(urllib.parse.urlparse(url).path).name or "weights.pt"
    tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    dest = cache_dir() / "weights" / f"{tag}-{name}"
    if dest.exists() and (sha256 is None or file_digest(dest, "sha256") == sha256.lower()):
        return dest
    try:
        return fetch(url, dest, sha256=sha256)
    except DownloadError as e:
        raise WeightsError(f"{e} (or pass the local path of a copy to load_weights)") from e


def load_weights(model: nn.Module, source: str | os.PathLike, sha256: str | None = None) -> nn.Module:
    """Load weights from a path or URL into ``model`` (strictly: every key, every shape); return ``model``.

    ``sha256``: the expected hash; for a local path without it, ``<path>.sha256``
    is used when present. A mismatch, an unreadable file or weights that do not fit
    raise :class:`WeightsError` naming the file and the fix; a downloaded file that
    fails is removed and never reused.
    """
    src = os.fspath(source)
    url = src if _is_url(src) else None
    if url is not None:
        path = _local_copy(url, sha256)
        fix = f"download it again (delete {path} and call load_weights again) or check the URL {url}"
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist. To fix: give the path or URL of a file "
                               "written by flatnb.models.weights.export_weights")
        side = path.with_name(path.name + ".sha256")
        if sha256 is None and side.is_file():
            sha256 = side.read_text().split()[0]
        fix = f"replace {path} with a complete copy (re-export it, or download it again)"
    if sha256 is not None:
        have = file_digest(path, "sha256")
        if have != sha256.lower():
            if url is not None:
                path.unlink(missing_ok=True)
            raise WeightsError(f"weights file {path} failed its SHA-256 check (got {have}, expected {sha256}): "
                               f"corrupted or a different file. To fix: {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, a pickle with code in it
        raise WeightsError(f"weights file {path} cannot be read ({type(e).__name__}: {e}). To fix: {fix}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state dict of tensors. To fix: {fix}")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:  # checked before loading, so a misfit leaves the model untouched
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise WeightsError(f"weights file {path} does not fit this model ({len(diff)} keys missing, extra or of "
                           f"another shape, e.g. {diff[:3]}). To fix: build the model with the architecture and "
                           "width the weights were exported from")
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- training checkpoints

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "done")


def read_checkpoint(ckpt: Path, device, model: nn.Module) -> dict | None:
    """A training checkpoint's contents (:func:`flatnb.training.train.train`), or ``None`` after moving a corrupt one aside.

    Corrupt means: ``torch.load`` fails (truncated file, garbage), a key is missing,
    or the weights do not fit ``model``. The file goes to ``<name>.corrupt-<UTC time>``
    (kept for inspection) and training starts again from scratch.
    """
    try:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise KeyError(f"missing keys {missing}")
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in state["model"].items()}
        if want != have:
            raise KeyError(f"weights do not fit the model ({len(set(want) ^ set(have))} keys differ)")
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, KeyError, AttributeError, TypeError,
            ValueError) as e:
        aside = ckpt.with_name(f"{ckpt.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(ckpt, aside)
        warnings.warn(f"checkpoint {ckpt} is corrupt or truncated ({type(e).__name__}: {e}); moved it to {aside} "
                      "and training again from scratch (delete that file once you no longer need it)",
                      RuntimeWarning, stacklevel=3)
        return None
    return state
