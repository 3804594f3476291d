"""Run any attack over a whole :class:`flatnb.data.Dataset`, batch by batch, into one result."""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn

from flatnb.attacks.core import AttackResult, _warn_zero_grad, cat_results, loss_name
from flatnb.data import batches


def attack_dataset(
    attack: Callable,
    model: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    seed: int | Callable[[int], int] | None = None,
    warn: bool = True,
    **kw,
) -> AttackResult:
    """``attack(model, x, y, **kw)`` on every batch of ``dataset`` (in order, no shuffling), joined.

    ``attack`` is any attack function of :mod:`flatnb.attacks` (``pgd``, ``apgd``, ``fgsm``,
    ``autoattack``...); ``dataset`` a :class:`flatnb.data.Dataset`, read through
    :func:`flatnb.data.batches` as pixels in [0, 1] on ``device``, cast to ``dtype`` if given (e.g.
    ``torch.float64`` for the float64 control of chapter 7).  ``seed`` gives each batch its own
    ``torch.Generator`` on ``device`` (for random starts): an int seeds every batch with that same
    value (the chapters' helpers did this), a callable ``batch_index -> seed`` seeds batch ``i`` with
    ``seed(i)``; ``None`` passes no generator (the global RNG is used).  A ``generator=`` in ``kw`` is
    refused: one generator shared by the batches would make a batch's draws depend on the batch
    size of the ones before it.  The zero-gradient warning is issued once, for the whole dataset
    (``warn=False`` silences it).  Returns the concatenated :class:`AttackResult`
    (``steps_run``: the smallest over the batches).
    """
    if "generator" in kw:
        raise ValueError("attack_dataset seeds a generator per batch: pass seed= (an int or batch_index -> int)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there is nothing to attack")
    params = inspect.signature(attack).parameters
    if "warn" in params:
        kw["warn"] = False
    if seed is not None and "generator" not in params:
        raise ValueError(f"{getattr(attack, '__name__', attack)!r} takes no generator, so seed= has no effect; drop it")
    device = torch.device(device)
    out = []
    for i, (x, y) in enumerate(batches(dataset, batch_size, device=device)):
        if dtype is not None:
            x = x.to(dtype)
        extra = {}
        if seed is not None:
            s = seed(i) if callable(seed) else seed
            extra["generator"] = torch.Generator(device=device).manual_seed(int(s))
        out.append(attack(model, x, y, **kw, **extra))
    res = cat_results(out)
    if warn and "warn" in params:
        _warn_zero_grad(res.zero_grad, loss_name(kw.get("loss", "ce")) if attack.__name__ != "apgd"
                        else f"APGD-{loss_name(kw.get('loss', 'ce'))}")
    return res
