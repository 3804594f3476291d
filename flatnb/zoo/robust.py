"""AutoAttack on the zoo's models, resumable, and robust accuracy for a chapter: read from the manifest when the
shipped model was measured on enough images, else measured here (cached in chunks).

The one attack setting of the zoo: the reference AutoAttack (``pyautoattack``, standard version), ℓ∞ 8/255 (and,
for the atlas of chapter 13, ℓ2 0.5: :data:`EPS`), on the seeded subset of ``n`` CIFAR-10 test images (seed 0), in
chunks of :data:`AA_CHUNK` images.
"""
from __future__ import annotations

import json
import math
import time

from flatnb import attacks
from flatnb import data as fdata
from flatnb.runtime import atomic_write_text, cache_dir
from flatnb.stats import Fraction, wilson
from flatnb.zoo import manifest as mf

ATTACK = "AutoAttack (reference, pyautoattack 0.2.0, standard version)"
#: the radius of each norm the zoo attacks in (RobustBench's CIFAR-10 threat models)
EPS = {"linf": 8 / 255, "l2": 0.5}
_NAME = {"linf": "ℓ∞ 8/255", "l2": "ℓ2 0.5"}


def _norm(norm: str) -> str:
    if norm not in EPS:
        raise ValueError(f"norm must be one of {sorted(EPS)} (the zoo's AutoAttack budgets), got {norm!r}")
    return norm


#: AutoAttack runs in chunks of this many test images; each chunk's outcome is cached, so an interrupted
#: measurement resumes at the first unfinished chunk (seed 0 in every chunk)
AA_CHUNK = 100


def autoattack(model, dataset: str, n: int, device, batch: int = 250, norm: str = "linf") -> dict:
    """The reference AutoAttack (standard, ``norm`` at its radius :data:`EPS`: ℓ∞ 8/255 or ℓ2 0.5) on the seeded
    subset of ``n`` test images, resumable: each chunk of :data:`AA_CHUNK` images is written to the cache (keyed
    by the weights' SHA-256, the norm and n) as it finishes."""
    eps = EPS[_norm(norm)]
    test = fdata.subset(fdata.load(dataset, "test"), n=n, seed=0)
    x, y = test.images.float().div(255), test.labels
    tag = "linf8" if norm == "linf" else "l2-0.5"  # ℓ∞'s name predates ℓ2: cached chunks keep their folder
    folder = cache_dir() / "zoo-autoattack" / f"{mf.state_sha256(model.state_dict())[:16]}-{dataset}-n{n}-{tag}"
    robust, minutes, fresh, fresh_n = [], 0.0, 0.0, 0
    for start in range(0, n, AA_CHUNK):
        stop = min(start + AA_CHUNK, n)
        path = folder / f"{start:05d}-{stop:05d}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
        else:
            t0 = time.time()
            res = attacks.autoattack(model, x[start:stop].to(device), y[start:stop].to(device), eps=eps,
                                     norm=norm, version="standard", batch_size=batch)
            rec = {"robust": [int(v) for v in (res.clean_correct & ~res.success).cpu()],
                   "clean": [int(v) for v in res.clean_correct.cpu()], "minutes": (time.time() - t0) / 60}
            atomic_write_text(path, json.dumps(rec) + "\n")
            fresh, fresh_n = fresh + rec["minutes"], fresh_n + stop - start
        robust += rec["robust"]
        minutes += rec["minutes"]
        left = fresh / fresh_n * (n - stop) if fresh_n else float("nan")
        print(f"  AutoAttack {_NAME[norm]} {stop}/{n}: {100 * sum(robust) / len(robust):.1f} % robust so far"
              + (f", about {left:.0f} min left" if math.isfinite(left) else " (cached)"), flush=True)
    ok = sum(robust)
    lo, hi = wilson(ok, n)
    return {"attack": ATTACK, "norm": norm,
            "eps": eps, "value": ok / n, "n": n, "ci95": [lo, hi],
            "images": f"seeded subset of {n} (seed 0), in chunks of {AA_CHUNK}", "minutes": minutes}


def measured(entry: dict, n: int, norm: str = "linf") -> dict | None:
    """A manifest entry's AutoAttack record (standard, ``norm`` at its radius :data:`EPS`) on at least ``n``
    images (the one on the most images), or None."""
    eps = EPS[_norm(norm)]
    found = [r for r in (entry or {}).get("robust", []) if r.get("attack") == ATTACK and r.get("norm") == norm
             and math.isclose(r.get("eps", 0.0), eps) and r.get("n", 0) >= n]
    return max(found, key=lambda r: r["n"]) if found else None


def shipped_measurement(model, n: int, norm: str = "linf") -> dict | None:
    """The manifest's AutoAttack (standard, ``norm``: ℓ∞ 8/255 or ℓ2 0.5) of the shipped ``model`` on at least
    ``n`` images, or None."""
    return measured(getattr(model, "shipped", None) or {}, n, norm)


def robust_accuracy(model, n: int = 1000, device="cpu", dataset: str = "cifar10",
                    norm: str = "linf") -> tuple[Fraction, str]:
    """AutoAttack robust accuracy (standard; ``norm`` ℓ∞ 8/255 or ℓ2 0.5) of ``model`` as a
    :class:`~flatnb.stats.Fraction`, and where it comes from: the manifest's measurement of the shipped model when
    it covers at least ``n`` images (``python -m flatnb.zoo measure``), else :func:`autoattack` here on ``n``
    images (resumable, cached)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive number of test images, got {n!r}")
    rec = shipped_measurement(model, n, norm)
    if rec is not None:
        k = round(rec["value"] * rec["n"])
        where = (f"weights/manifest.json ({model.shipped['name']}): reference AutoAttack, standard, {_NAME[norm]} on "
                 f"{rec['images']}, measured at commit {str(rec.get('commit', model.shipped.get('commit')))[:7]}")
        return Fraction(k, rec["n"]), where
    rec = autoattack(model, dataset, n, device, norm=norm)
    return (Fraction(round(rec["value"] * n), n),
            f"measured here: reference AutoAttack, standard, {_NAME[norm]} on {rec['images']}")
