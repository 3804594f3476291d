"""Where and how a chapter runs: profile, device, cache folder, provenance.

Nothing here is global state: every function takes what it needs and returns a
value, so a chapter's parameters cell decides everything explicitly.
"""
from __future__ import annotations

import errno
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy
import torch

from flatnb import __version__

#: quick = minutes on a CPU; full = the shipped evidence models at referee sample sizes (about 3 h on 2 CPU cores,
#: minutes on a GPU); smoke = the full profile's code paths (its models, recipes, chapter branches) at toy sizes,
#: to test a full-profile run in minutes
#: (``python -m flatnb.book --profile full --dry-run``); its numbers mean nothing and make no run record.
PROFILES = ("quick", "full", "smoke")


def resolve_profile(profile: str, device: torch.device | str | None = None) -> str:
    """Map ``"auto" | "quick" | "full" | "smoke"`` to a concrete profile (:data:`PROFILES`).

    ``auto`` means ``full`` on a CUDA device and ``quick`` elsewhere, so that a
    Colab GPU runtime gets the full profile in minutes and a laptop or CI gets the quick one.
    """
    if profile == "auto":
        dev = torch.device(device) if device is not None else default_device()
        return "full" if dev.type == "cuda" else "quick"
    if profile not in PROFILES:
        raise ValueError(f"profile must be 'auto', 'quick', 'full' or 'smoke', got {profile!r}")
    return profile


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks :func:`default_device`; anything else is taken as is."""
    if device is None or device == "auto":
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for but CUDA is not available; "
            "use device='cpu' or device='auto'"
        )
    return dev


def cache_dir() -> Path:
    """Folder for decoded datasets and trained checkpoints.

    ``FLATNB_CACHE`` overrides the default ``~/.cache/flatnb``; the folder is
    shared by all chapters so that each model is trained once.
    """
    path = Path(os.environ.get("FLATNB_CACHE", Path.home() / ".cache" / "flatnb")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, then ``os.replace`` it onto ``path``.

    A reader never sees a half-written file: an interrupted write leaves the previous file (or none) in place.
    A full disk raises ``OSError(ENOSPC)`` that says where and how much room is left.
    """
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` atomically (:func:`atomic_write_bytes`): a reader never sees a half-written cache or
    checkpoint."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_write(path, write) -> None:
    """The one temp-file + ``os.replace`` pattern: ``write(f)`` fills a binary temp file beside ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; caches and records are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _disk_full(e):
            free = shutil.disk_usage(path.parent).free / 2**30
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path} ({free:.1f} GiB free "
                          f"there now): free space on that disk, or point FLATNB_CACHE at a folder on a disk "
                          f"with room") from e
        raise


def _disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from is ENOSPC (torch wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def describe_device(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    """The versions of Python and of the libraries a chapter's numbers depend on (those installed)."""
    out = {"python": platform.python_version(), "flatnb": __version__, "torch": torch.__version__,
           "numpy": numpy.__version__}
    for name in ("torchvision", "sympy", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def draw(fn, shape, device, dtype=None, generator: torch.Generator | None = None, **kw) -> torch.Tensor:
    """``fn(shape, ...)`` (``torch.rand``/``randn``/``randint``-like) on ``device``, drawn from ``generator``.

    The numbers come from the generator's own device and are then moved, so a CPU
    generator works with CUDA tensors (and gives the same numbers on every device).
    """
    gdev = generator.device if generator is not None else device
    if dtype is not None:
        kw["dtype"] = dtype
    return fn(shape, generator=generator, device=gdev, **kw).to(device)
