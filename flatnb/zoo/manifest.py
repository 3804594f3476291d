"""``weights/manifest.json``: one entry per shipped model, and the functions that write, find and load them.

An entry (written by :func:`export`) holds: ``file`` (relative to the weights folder) and its ``sha256``;
``fp32_sha256``, the hash of the float32 weights before the half-precision cast (:func:`state_sha256`,
what a bit-identical retraining must reproduce); ``recipe`` (arch, dataset, recipe name, profile, seed of
:data:`flatnb.recipes.TABLE`), ``config`` (the whole :class:`~flatnb.train.TrainConfig`) and
``config_key`` (its checkpoint key with the training data's digest); ``data`` (digest and description of the
training data); ``clean`` (accuracy of the shipped half-precision weights on the test split: value, n);
``robust`` (a list of {attack, eps, norm, value, n}); ``training`` (device, threads, minutes, per-epoch
history); ``commit``. An external model (the ResNet-18 that ships inside ``pyautoattack``) has
``external`` instead of ``recipe``/``config`` and is loaded by :func:`load_external`.

A recipe's file name carries its config key, so a changed recipe is a new file and never overwrites a
shipped one. Every load checks the SHA-256; a mismatch is a :class:`ManifestError` naming the file and the fix.

A shipped file is the ``torch.save`` of the half-precision state dict, xz-compressed (``<name>.pt.xz``: about a
tenth smaller, so the catalogue fits the 60 MiB that ``weights/`` may hold). Outside flatnb it opens with
``torch.load(lzma.open(path), weights_only=True)``; :func:`load_state` reads it, and plain ``.pt`` files too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import lzma
import os
import subprocess
from pathlib import Path

import torch
import torch.nn as nn
from filelock import FileLock

from flatnb import models as fmodels
from flatnb.config.train_config import TrainConfig
from flatnb.data.download import file_digest
from flatnb.runtime import atomic_write_bytes, atomic_write_text, resolve_device, resolve_profile
from flatnb.training import train as ftrain

MANIFEST = "manifest.json"
FORMAT = 1
#: where shipped weights are looked for when no folder is given: $FLATNB_WEIGHTS, else ``weights/`` of the
#: checkout the package runs from, else ``./weights`` or ``../weights`` (a chapter runs inside ``book/``)
WEIGHTS_ENV = "FLATNB_WEIGHTS"


class ManifestError(ValueError):
    """A shipped weights file is missing, failed its SHA-256 check, or does not fit its recipe."""


def weights_dir(root: str | os.PathLike | None = None) -> Path | None:
    """The folder of shipped weights (holding ``manifest.json``), or ``None`` when there is none."""
    if root is not None:
        return Path(root)
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    here = Path(__file__).resolve().parents[2] / "weights"
    for c in (here, Path.cwd() / "weights", Path.cwd().parent / "weights"):
        if (c / MANIFEST).is_file():
            return c
    return None


def read_manifest(root: str | os.PathLike | None = None) -> dict:
    """The manifest as a dict (``{"format": 1, "models": {}}`` where there is none)."""
    folder = weights_dir(root)
    path = folder / MANIFEST if folder is not None else None
    if path is None or not path.is_file():
        return {"format": FORMAT, "models": {}}
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} cannot be read ({type(e).__name__}: {e}). To fix: restore it with "
                            f"`git checkout -- {path}`") from e
    if m.get("format") != FORMAT or not isinstance(m.get("models"), dict):
        raise ManifestError(f"{path} is not a format-{FORMAT} manifest. To fix: `git checkout -- {path}`")
    return m


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict: every key in sorted order with its dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in half precision, the rest (BatchNorm counters) as they are."""
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().to("cpu")).contiguous()
            for k, v in state.items()}


#: the suffix of a shipped weights file: an xz-compressed torch state dict
SUFFIX = ".pt.xz"


def file_name(config: TrainConfig, key: str) -> str:
    c = config
    return f"{c.arch}-{c.dataset}-{c.recipe}-{c.profile}-s{c.seed}-{key}{SUFFIX}"


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state`` as a shipped file: ``torch.save``, xz-compressed (preset 9e), atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a shipped file on the CPU: ``<name>.pt.xz`` (:func:`save_state`) or a plain ``.pt``."""
    path = Path(path)
    if not path.name.endswith(".xz"):
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        data = lzma.decompress(path.read_bytes())
    except lzma.LZMAError as e:
        raise ManifestError(f"{path} is not a valid xz file ({e}): a damaged download or checkout. To fix: "
                            f"`git checkout -- {path}`") from e
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def config_from(entry: dict) -> TrainConfig:
    """The :class:`TrainConfig` stored in an entry (JSON lists back to the tuples the dataclass holds)."""
    kw = dict(entry["config"])
    kw["model_kw"] = tuple(tuple(p) for p in kw.get("model_kw", ()))
    return TrainConfig(**kw)


def find(config: TrainConfig, data_digest: str, root=None) -> tuple[str, dict] | None:
    """``(name, entry)`` of the shipped model trained with exactly ``config`` on data ``data_digest``."""
    key = config.key(data_digest)
    for name, entry in read_manifest(root)["models"].items():
        if entry.get("config_key") == key:
            return name, entry
    return None


def _checked_path(name: str, entry: dict, folder: Path) -> Path:
    path = folder / entry["file"]
    retrain = f"python -m flatnb.zoo train --only {name}"
    if not path.is_file():
        raise ManifestError(f"shipped weights {path} of {name!r} are missing. To fix: `git checkout -- {path}` "
                            f"(or retrain them: {retrain})")
    have = file_digest(path, "sha256")
    if have != entry["sha256"]:
        raise ManifestError(f"shipped weights {path} of {name!r} failed their SHA-256 check (got {have}, the "
                            f"manifest says {entry['sha256']}): a damaged or replaced file. To fix: "
                            f"`git checkout -- {path}` (or retrain them: {retrain})")
    return path


def load(name: str, device=None, root=None) -> nn.Module:
    """The shipped model ``name`` of the manifest, float32, in eval mode on ``device``; ``model.train_info``
    holds its recipe and ``model.shipped`` its manifest entry."""
    folder = weights_dir(root)
    models = read_manifest(root)["models"]
    if folder is None:
        raise ManifestError(f"no folder of shipped weights found for {name!r}: none in ${WEIGHTS_ENV}, in the "
                            f"checkout this package runs from, in ./weights or in ../weights. To fix: run from a "
                            f"clone of the book (its weights/ folder), or set {WEIGHTS_ENV}=/path/to/weights")
    if name not in models:
        raise ManifestError(f"no shipped model {name!r} in {folder}/{MANIFEST} (it holds {sorted(models)}). "
                            "To fix: pick one of those, or train it: python -m flatnb.zoo train")
    entry = models[name]
    if "external" in entry:
        return load_external(name, device, root)
    path = _checked_path(name, entry, folder)
    config = config_from(entry)
    model = ftrain.build_model(config)
    state = load_state(path)
    want = model.state_dict()
    if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
        raise ManifestError(f"shipped weights {path} do not fit the recipe of {name!r}. To fix: retrain them "
                            f"(python -m flatnb.zoo train --only {name})")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()})
    model = model.to(resolve_device(device)).eval()
    model.train_info = {"config": dataclasses.asdict(config), "data_digest": entry["data"]["digest"],
                        "history": entry.get("training", {}).get("history", []), "shipped": name}
    model.shipped = dict(entry, name=name)
    return model


def load_external(name: str, device=None, root=None) -> nn.Module:
    """An external model of the manifest (``external``: the package that ships the file, the file inside
    it, the module that defines the network, the class or factory, the head's name), SHA-256 checked,
    wrapped into the model contract with :func:`flatnb.models.wrap`."""
    entry = read_manifest(root)["models"][name]
    ext = entry["external"]
    spec = importlib.util.find_spec(ext["package"])
    if spec is None or spec.origin is None:
        raise ManifestError(f"{name!r} ships inside the package {ext['package']!r}, which is not installed. "
                            f"To fix: python -m pip install {ext['requirement']}")
    base = Path(spec.origin).parent
    path = base / ext["file"]
    have = file_digest(path, "sha256") if path.is_file() else "missing"
    if have != entry["sha256"]:
        raise ManifestError(f"{path} ({name!r}) has SHA-256 {have}, the manifest pins {entry['sha256']}. To fix: "
                            f"reinstall the pinned version: python -m pip install --force-reinstall {ext['requirement']}")
    mspec = importlib.util.spec_from_file_location(f"_flatnb_external_{name.replace('-', '_')}", base / ext["module"])
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    net = getattr(module, ext["factory"])()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = fmodels.wrap(net.eval(), head=ext["head"], example=torch.rand(2, 3, 32, 32)).to(resolve_device(device))
    model.eval()
    model.train_info = {"config": {"arch": ext["arch"], "dataset": "cifar10", "recipe": "external"},
                        "shipped": name}
    model.shipped = dict(entry, name=name)
    return model


def model(arch: str, dataset: str, recipe: str = "standard", profile: str = "quick", seed: int = 0, device=None,
          root=None, progress: bool | None = None, weights=None) -> nn.Module:
    """The model of ``(arch, dataset, recipe)`` in ``profile`` with ``seed``: the shipped weights when the
    manifest (``weights``: its folder) holds exactly this configuration and training data, else trained once
    and cached (:func:`flatnb.train.trained_model`)."""
    device = resolve_device(device)
    profile = resolve_profile(profile, device)
    config = ftrain.config_for(arch, dataset, recipe, profile, seed)
    digest = ftrain.training_data(config, root).digest
    hit = find(config, digest, weights)
    if hit is not None:
        return load(hit[0], device, weights)
    return ftrain.train(config, device, root=root, progress=progress)


# ----------------------------------------------------------------------------- writing

def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[2])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_entry(name: str, entry: dict, root) -> None:
    """Add or replace one entry, under a file lock (two shards may finish at once), atomically."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / (MANIFEST + ".lock"))):
        m = read_manifest(folder)
        m["models"][name] = entry
        m["models"] = dict(sorted(m["models"].items()))
        atomic_write_text(folder / MANIFEST, json.dumps(m, indent=1, sort_keys=False) + "\n")


def export(trained: nn.Module, config: TrainConfig, data_digest: str, name: str, root, *,
           clean: dict, training: dict, robust: list | None = None, data_source: str = "") -> dict:
    """Write ``trained``'s weights in half precision to ``root/<file>`` and its manifest entry; return the entry.

    The file name carries the config key; an existing file of that name with other weights is an error
    (the same recipe and data gave different weights: retraining is not reproducible), never an overwrite.
    """
    folder = Path(root)
    state = {k: v.detach().to("cpu").contiguous() for k, v in trained.state_dict().items()}
    key = config.key(data_digest)
    fname = file_name(config, key)
    half = half_state(state)
    path = folder / fname
    if path.exists():
        old = load_state(path)
        if state_sha256(old) != state_sha256(half):
            raise ManifestError(f"{path} exists with other weights for the same recipe and data: training is not "
                                "reproducible here. To fix: find out why (threads, device), or delete the file on purpose")
    else:
        save_state(half, path)
    entry = {"file": fname, "sha256": file_digest(path, "sha256"), "fp32_sha256": state_sha256(state),
             "recipe": {"arch": config.arch, "dataset": config.dataset, "recipe": config.recipe,
                        "profile": config.profile, "seed": config.seed},
             "config": json.loads(json.dumps(dataclasses.asdict(config), default=list)),
             "config_key": key, "data": {"digest": data_digest, "source": data_source},
             "clean": clean, "robust": list(robust or []), "training": training, "commit": _git_commit(),
             "bytes": path.stat().st_size}
    write_entry(name, entry, folder)
    return entry
