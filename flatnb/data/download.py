"""Where the datasets live and how they arrive: data roots, source discovery, atomic verified downloads.

:func:`data_root` and :func:`find_source` locate a dataset under the data folder
(:mod:`flatnb.data` decodes it); with ``download=True`` a missing one is fetched.

Every download goes to a temporary name in the destination folder and is renamed
into place only when it is complete and its checksum matches, so an interrupted
or corrupted transfer never leaves a file that :mod:`flatnb.data` would take for
data. Each failure raises :class:`DownloadError` naming the file, the URL and how
to supply the data by hand.

The URLs and checksums live in :data:`SOURCES` (tests point them at a local
server). Tiny ImageNet is the cs231n release (200 classes, 64x64) that
``walter2026flatness`` evaluates on. No SHA-256 of
``tiny-imagenet-200.zip`` is published by its authors; the file is checked by its
size and by the MD5 that torchvision-style loaders have used for years.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flatnb.config.train_config import DATASETS

_CACHE_VERSION = 2  # part of the decoded-data cache key (flatnb.data)

#: name -> where the archive comes from and how it is checked (None = not checked)
SOURCES: dict[str, dict] = {
    "tinyimagenet": {
        "url": "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "filename": "tiny-imagenet-200.zip",
        "sha256": None,  # not published; size + MD5 below
        "md5": "90528d7ca1a48142e341f4ef8d21d0de",
        "size": 248_100_043,
    },
}


class DownloadError(OSError):
    """A download failed, was cut off, or did not match its checksum; nothing was left behind."""


def default_data_root() -> Path:
    """``$FLATNB_DATA`` if set, else ``~/.cache/flatnb/data`` (where downloads go by default)."""
    env = os.environ.get("FLATNB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flatnb" / "data"


def ensure_writable(folder: Path, what: str, url: str = "") -> Path:
    """Create ``folder`` if needed and prove it is writable (by writing a temp file there)."""
    folder = Path(folder)
    src = f" from {url}" if url else ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".flatnb-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DownloadError(
            f"cannot download {what}{src}: the folder {folder} cannot be created or written ({e}). "
            f"To fix: make it writable, or set FLATNB_DATA (or pass root=...) to a writable folder, "
            f"or put {what} there by hand") from e
    return folder


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, sha256: str | None = None, md5: str | None = None, size: int | None = None,
          timeout: float = 60.0, progress: bool = False) -> Path:
    """Download ``url`` to ``dest`` atomically and verify it; return ``dest``.

    The bytes go to a temp file next to ``dest``; it is checked (length against the
    server's ``Content-Length``, then ``size``, ``sha256``, ``md5`` where given) and
    only then renamed to ``dest``. Any failure removes the temp file and raises
    :class:`DownloadError` naming the file, the URL and the fix.
    """
    dest = Path(dest)
    fix = (f"To fix: check the network and run again, or download {url} by hand "
           f"and put it at {dest}")
    ensure_writable(dest.parent, dest.name, url)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        got = 0
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "flatnb"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
                expected = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
                expected = int(expected) if expected and expected.isdigit() else None
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    if progress and (got // 2**20) % 16 == 0:  # a line every 16 MiB, not every chunk
                        print(f"\r{dest.name}: {got / 2**20:.0f} MiB", end="", flush=True)
            if progress:
                print()
        except urllib.error.HTTPError as e:
            raise DownloadError(f"downloading {dest.name} from {url} failed: HTTP {e.code} {e.reason}. {fix}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: malformed URL
            raise DownloadError(f"downloading {dest.name} from {url} failed after {got} bytes: {e}. {fix}") from e
        except Exception as e:  # http.client.IncompleteRead and friends: the connection was cut
            raise DownloadError(f"downloading {dest.name} from {url} was cut off after {got} bytes: {e!r}. {fix}") from e
        if expected is not None and got != expected:
            raise DownloadError(f"downloading {dest.name} from {url} was cut off: {got} of {expected} bytes. {fix}")
        if size is not None and got != size:
            raise DownloadError(f"{dest.name} from {url} has {got} bytes, expected {size}: wrong or truncated file. {fix}")
        for algo, want in (("sha256", sha256), ("md5", md5)):
            if want is not None:
                have = file_digest(Path(tmp), algo)
                if have != want.lower():
                    label = {"sha256": "SHA-256", "md5": "MD5"}[algo]
                    raise DownloadError(f"{dest.name} from {url} failed its {label} check "
                                        f"(got {have}, expected {want}): corrupted or replaced download. {fix}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def download_tinyimagenet(root: Path, progress: bool = True) -> Path:
    """Fetch ``tiny-imagenet-200.zip`` into ``root`` (verified, atomic) and return its path."""
    s = SOURCES["tinyimagenet"]
    return fetch(s["url"], Path(root) / s["filename"], sha256=s.get("sha256"), md5=s.get("md5"),
                 size=s.get("size"), progress=progress)


def download_cifar(name: str, root: Path) -> Path:
    """CIFAR-10/100 through torchvision's downloader, staged so that only a verified folder lands in ``root``.

    torchvision downloads and checks the tarball (its ``tgz_md5``), extracts it and
    checks every pickle (its per-file MD5 lists), all inside a temporary folder in
    ``root``; only then is ``cifar-10-batches-py`` (or ``cifar-100-python``) moved
    into ``root``. Returns that folder.
    """
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    root = Path(root)
    url, what = cls.url, cls.filename
    ensure_writable(root, what, url)
    final = root / cls.base_folder
    stage = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-download-"))
    fix = (f"To fix: check the network and run again, or download {url} by hand, extract it "
           f"and put its folder {cls.base_folder}/ into {root}")
    try:
        try:
            for train in (True, False):
                cls(str(stage), train=train, download=True)
        except Exception as e:  # torchvision raises URLError, HTTPError, OSError or RuntimeError
            raise DownloadError(f"downloading {what} from {url} (torchvision) failed: {e!r}. {fix}") from e
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage / cls.base_folder, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


HOW_TO_SUPPLY = (
    "set FLATNB_DATA=/path/to/folder holding cifar-10-batches-py/ or cifar10-webp.tar.gz, "
    "tiny-imagenet-200.zip (or .tar.gz / extracted folders) or cifar-100-python/, or pass root=...; "
    "or pass download=True to fetch CIFAR-10/100 (torchvision) and Tiny ImageNet (official URL)"
)


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
    raise FileNotFoundError(f"no data folder found (from {origin}); looked in: {looked}. To fix: {HOW_TO_SUPPLY}")


# --------------------------------------------------------------------------- sources

@dataclass
class Source:
    kind: str  # "webp-tar" | "webp-dir" | "pickle-dir" | "tiny-tar" | "tiny-zip" | "tiny-dir"
    path: Path
    prefix: str = ""  # folder inside an archive that holds train/ and test/ (or val/)
    extra: dict = field(default_factory=dict)


def find_source(name: str, root: Path, download: bool) -> Source:
    looked: list[Path] = []

    def exists(p: Path) -> bool:
        looked.append(p)
        return p.exists()

    if name == "cifar10":
        if exists(root / "cifar-10-batches-py" / "batches.meta"):  # torchvision's own download
            return Source("pickle-dir", root / "cifar-10-batches-py")
        for ext in (".tar.gz", ".tgz", ".tar"):  # the same images as lossless WebP (../shared/data)
            if exists(root / f"cifar10-webp{ext}"):
                return Source("webp-tar", root / f"cifar10-webp{ext}")
        for stem in ("cifar10-webp", "cifar10"):
            if exists(root / stem / "train") and (root / stem / "test").is_dir():
                return Source("webp-dir", root / stem)
    elif name == "cifar100":
        if exists(root / "cifar-100-python" / "meta"):
            return Source("pickle-dir", root / "cifar-100-python")
    elif name == "tinyimagenet":
        for ext, kind in ((".tar.gz", "tiny-tar"), (".tgz", "tiny-tar"), (".tar", "tiny-tar"), (".zip", "tiny-zip")):
            if exists(root / f"tiny-imagenet-200{ext}"):
                return Source(kind, root / f"tiny-imagenet-200{ext}")
        if exists(root / "tiny-imagenet-200" / "wnids.txt"):
            return Source("tiny-dir", root / "tiny-imagenet-200")
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")

    if download:
        if name == "tinyimagenet":
            download_tinyimagenet(root)
        else:
            download_cifar(name, root)
        return find_source(name, root, download=False)
    raise FileNotFoundError(
        f"{name} not found under {root}; looked for: " + ", ".join(str(p) for p in looked) + f". To fix: {HOW_TO_SUPPLY}"
    )


def source_key(src: Source) -> str:
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


def root_for(root, download: bool, name: str) -> Path:
    """:func:`data_root`, except that with ``download`` a missing folder is created (and must be writable)."""
    try:
        return data_root(root)
    except FileNotFoundError:
        if not download:
            raise
        folder = Path(root).expanduser() if root is not None else default_data_root()
        return ensure_writable(folder, *_file_and_url(name)).resolve()


def _file_and_url(name: str) -> tuple[str, str]:
    """The archive a download of ``name`` fetches, and from where."""
    if name == "tinyimagenet":
        return SOURCES[name]["filename"], SOURCES[name]["url"]
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return cls.filename, cls.url
