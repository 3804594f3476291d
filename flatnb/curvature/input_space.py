"""Curvature in input space: gradients, Hessian-vector products, directional curvature,
and the directions chapter 11 compares (augmentation tangents, neighbours, random, attack).
"""
from __future__ import annotations

import warnings

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flatnb.curvature._common import _ce_sum, _math_attention, require_eval
from flatnb.runtime import draw

Tensor = torch.Tensor


# ---------------------------------------------------------------------------
# In eval mode the samples of a batch do not interact, so the Hessian of the
# *summed* loss w.r.t. the batch of inputs is block-diagonal: one HVP of the sum
# with a batch of directions gives every sample's own HVP at once.


def _input_loss(model, y, loss_fn):
    fn = _ce_sum if loss_fn is None else loss_fn

    def f(x):
        with _math_attention():
            return fn(model(x), y)

    return f


def _check_xy(x: Tensor, y: Tensor) -> None:
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match inputs {tuple(x.shape)}, got {tuple(y.shape)}")


def input_gradient(model, x: Tensor, y: Tensor, loss_fn=None) -> Tensor:
    """Per-sample loss gradient w.r.t. the input, same shape as ``x``.

    ``loss_fn(logits, y)`` must return the *sum* of per-sample losses (default: CE sum).
    A measurement: the result is detached (it holds no graph through the model's parameters).
    """
    require_eval(model)
    _check_xy(x, y)
    return torch.func.grad(_input_loss(model, y, loss_fn))(x.detach()).detach()


def input_gradient_norm(model, x: Tensor, y: Tensor, loss_fn=None) -> Tensor:
    """Per-sample ``||grad_x loss||_2``, (N,)."""
    return input_gradient(model, x, y, loss_fn).flatten(1).norm(dim=1)


def input_hvp(model, x: Tensor, y: Tensor, v: Tensor, loss_fn=None) -> Tensor:
    """Per-sample input Hessian-vector product ``(grad_x^2 loss_i) v_i``, same shape as ``x``.

    Forward-over-reverse; double backward where forward-mode AD is unsupported.  A measurement: the
    result is detached, so a loop of HVPs (power iteration, many directions) does not keep one autograd
    graph through the model's parameters per call alive.
    """
    require_eval(model)
    _check_xy(x, y)
    if v.shape != x.shape:
        raise ValueError(f"v must have the inputs' shape {tuple(x.shape)}, got {tuple(v.shape)}")
    f = _input_loss(model, y, loss_fn)
    x0, v = x.detach(), v.to(x)
    try:
        with _math_attention(), warnings.catch_warnings():
            # torch loads its forward-mode AD decompositions through torch.jit.script on the first
            # jvp of a process and warns that jit.script is deprecated; nothing to act on
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
            return torch.func.jvp(torch.func.grad(f), (x0,), (v,))[1].detach()
    except (RuntimeError, NotImplementedError):
        xr = x0.clone().requires_grad_(True)
        with torch.enable_grad(), _math_attention():
            g = torch.autograd.grad(f(xr), xr, create_graph=True)[0]
            return torch.autograd.grad(g, xr, v)[0].detach()


def directional_curvature(model, x: Tensor, y: Tensor, directions: Tensor, loss_fn=None) -> Tensor:
    """Curvature ``d^T (grad_x^2 loss_i) d / ||d||^2`` along per-sample directions.

    ``directions`` has the shape of ``x`` (one direction per sample, result (N,)) or
    (P, *x.shape) (P directions per sample, result (P, N)), e.g. the attack step,
    random directions, or :func:`neighbour_directions`.  Zero directions raise.
    """
    single = directions.shape == x.shape
    d = directions.unsqueeze(0) if single else directions
    if d.shape[1:] != x.shape:
        raise ValueError(f"directions must have shape {tuple(x.shape)} or (P, *{tuple(x.shape)}), got {tuple(directions.shape)}")
    sq = d.flatten(2).pow(2).sum(-1)
    if not bool((sq > 0).all()):
        raise ValueError("a direction is zero; curvature along it is undefined")
    out = torch.stack([(input_hvp(model, x, y, di, loss_fn) * di).flatten(1).sum(-1) for di in d]) / sq
    return out[0] if single else out


def neighbour_directions(x: Tensor, y: Tensor, pool_x: Tensor, pool_y: Tensor, index: Tensor | None = None) -> Tensor:
    """Unit direction from each ``x_i`` to its nearest same-class point of the pool.

    ``index`` (N,) gives the position of each ``x_i`` in the pool when the inputs are drawn from it:
    that point is excluded by index.  Pool points identical to ``x_i`` (its own copy when ``index`` is
    not given, or a duplicate image) give no direction and are excluded too; distances are computed
    exactly (no matrix-multiplication shortcut, whose self-distances come out as ~3e-8 rather than 0
    for more than 25 rows), so "identical" means bit-identical.
    """
    _check_xy(x, y)
    xf, pf = x.flatten(1), pool_x.flatten(1).to(x)
    dist = torch.cdist(xf, pf, compute_mode="donot_use_mm_for_euclid_dist")
    dist = dist.masked_fill(pool_y.to(y.device)[None, :] != y[:, None], float("inf"))
    dist = dist.masked_fill(dist == 0, float("inf"))  # exact: zero only for an identical point
    if index is not None:
        index = torch.as_tensor(index, device=x.device, dtype=torch.long)
        if index.shape != (x.shape[0],) or bool(((index < 0) | (index >= pool_x.shape[0])).any()):
            raise ValueError(f"index must hold one pool position per input, got shape {tuple(index.shape)} "
                             f"for {x.shape[0]} inputs and a pool of {pool_x.shape[0]}")
        dist = dist.scatter(1, index[:, None], float("inf"))
    idx = dist.argmin(dim=1)
    if not bool(torch.isfinite(dist.gather(1, idx[:, None])).all()):
        raise ValueError("some inputs have no other same-class point in the pool")
    d = pool_x.to(x)[idx] - x
    return d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))


class InputEigen(NamedTuple):
    """Per-sample top input-Hessian eigenpair: ``values`` (N,), unit ``vectors`` (shape of x)."""

    values: Tensor
    vectors: Tensor


def input_top_eigenvalue(
    model, x: Tensor, y: Tensor, n_iter: int = 50, loss_fn=None, generator: torch.Generator | None = None
) -> InputEigen:
    """Largest-magnitude eigenvalue of each sample's input Hessian by batched power iteration.

    For ReLU networks the input Hessian of CE is ``J^T M(p) J`` (PSD), so this is
    the top eigenvalue.  Fixed ``n_iter``, no host sync.
    """
    v = draw(torch.randn, x.shape, x.device, x.dtype, generator)
    shape = (-1,) + (1,) * (x.dim() - 1)
    v = v / v.flatten(1).norm(dim=1).view(shape)
    lam = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(n_iter):
        w = input_hvp(model, x, y, v, loss_fn)
        lam = (w * v).flatten(1).sum(-1)
        v = w / w.flatten(1).norm(dim=1).clamp_min(tiny).view(shape)
    return InputEigen(values=lam, vectors=v)


# ---------------------------------------------------------------------------
# Directions along and away from the data manifold
# ---------------------------------------------------------------------------

AUGMENTATIONS = ("shift_x", "shift_y", "brightness", "contrast")


def augmentation_directions(x: Tensor, kinds=AUGMENTATIONS) -> Tensor:
    """Unit tangent directions of small image augmentations at each image, (P, *x.shape).

    Each direction is ``d/ds aug(x, s)`` at ``s = 0`` (before clamping to [0, 1]), normalised:

    * ``shift_x`` / ``shift_y``: sub-pixel translation that samples the image at column (row)
      ``j + s``, bilinear with border replication (``grid_sample``): the forward difference
      ``x[j+1] - x[j]``, zero in the last column (row);
    * ``brightness``: torchvision's ``adjust_brightness`` factor ``1 + s``: ``x`` itself;
    * ``contrast``: torchvision's ``adjust_contrast`` factor ``1 + s``: ``x`` minus the mean of
      its grayscale image (ITU-R 601 weights).

    Translated, brighter or more contrasted images are images of the same scene, so these
    directions stay (to first order) on the data manifold.  ``x`` is (N, C, H, W); a
    direction that vanishes (e.g. a shift of a constant image) raises.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (N, C, H, W), got {tuple(x.shape)}")
    bad = [k for k in kinds if k not in AUGMENTATIONS]
    if bad or not len(kinds):
        raise ValueError(f"kinds must be a non-empty selection of {AUGMENTATIONS}, got {tuple(kinds)!r}")
    out = []
    for kind in kinds:
        if kind == "shift_x":
            d = torch.zeros_like(x)
            d[..., :-1] = x[..., 1:] - x[..., :-1]
        elif kind == "shift_y":
            d = torch.zeros_like(x)
            d[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
        elif kind == "brightness":
            d = x.clone()
        else:
            if x.shape[1] == 3:
                gray = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).to(x.dtype)
            else:
                gray = x.mean(dim=1)
            d = x - gray.mean(dim=(-2, -1)).view(-1, 1, 1, 1)
        try:
            out.append(unit_directions(d))
        except ValueError:
            raise ValueError(f"the {kind} direction vanishes for some image (constant image?); drop that image") from None
    return torch.stack(out)


def unit_directions(d: Tensor, input_dims: int = 3) -> Tensor:
    """``d`` with every direction scaled to unit ℓ2 norm over its last ``input_dims`` dims
    (3 for images (C, H, W), 1 for flat inputs); a zero direction raises."""
    if not 1 <= input_dims < d.dim():
        raise ValueError(f"input_dims must be between 1 and d.dim() - 1 = {d.dim() - 1}, got {input_dims}")
    norm = d.flatten(-input_dims).norm(dim=-1)
    if not bool((norm > 0).all()):
        raise ValueError("a direction is zero and cannot be normalised (e.g. a zero attack step or gradient)")
    return d / norm.view(*norm.shape, *[1] * input_dims)


@torch.no_grad()
def loss_along(model, x: Tensor, y: Tensor, direction: Tensor, ts, loss_fn=None) -> Tensor:
    """Per-sample loss change ``loss(x + t d) - loss(x)`` for each ``t`` in ``ts``, (len(ts), N).

    No clamping to [0, 1] (the line is the object of study).  ``direction`` has ``x``'s
    shape; ``loss_fn(logits, y)`` returns per-sample losses (default: cross-entropy).
    """
    require_eval(model)
    _check_xy(x, y)
    if direction.shape != x.shape:
        raise ValueError(f"direction must have the inputs' shape {tuple(x.shape)}, got {tuple(direction.shape)}")
    fn = loss_fn or (lambda z, t: F.cross_entropy(z, t, reduction="none"))
    d = direction.to(x)
    base = fn(model(x), y)
    return torch.stack([fn(model(x + float(t) * d), y) - base for t in ts])
