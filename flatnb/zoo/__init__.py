"""The evidence zoo: the book's trained models, shipped as half-precision weights under ``weights/`` with a
manifest, and the command that trains, measures and checks them (``python -m flatnb.zoo``).

Owns: :mod:`~flatnb.zoo.manifest` (read, write and verify ``weights/manifest.json``; load a shipped model
into the model contract; :func:`model`, the one way a chapter gets a model: shipped weights when the
manifest holds the recipe's exact configuration and training data, else trained once and cached),
:mod:`~flatnb.zoo.catalogue` (which models the book ships), :mod:`~flatnb.zoo.robust` (AutoAttack on them,
resumable; :func:`robust_accuracy` for a chapter: the manifest's measurement or one made here) and :mod:`~flatnb.zoo.cli` (the command).
May import: runtime, config, data, models, training and attacks (it sits above them and below ``book``).
"""
from flatnb.zoo.manifest import (ManifestError, find, load, load_external, model, read_manifest, state_sha256,
                                 weights_dir)
from flatnb.zoo.robust import robust_accuracy

__all__ = ["ManifestError", "find", "load", "load_external", "model", "read_manifest", "robust_accuracy",
           "state_sha256", "weights_dir"]
