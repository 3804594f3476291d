"""The parameter-space Hessian as an operator, and algorithms that take an operator.

:class:`ParameterHVP` gives Hessian-vector products of a loss w.r.t. a model's parameters;
:func:`hutchinson_trace`, :func:`lanczos`, :func:`power_iteration_deflated` take any such
operator (curvlinops / pytorch-hessian-eigenthings style: operators apart from algorithms).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from flatnb.curvature._common import _ce_mean, _math_attention, require_eval
from flatnb.runtime import draw

Tensor = torch.Tensor


class ParameterHVP:
    """Hessian-vector products of ``loss_fn(model(inputs), targets)`` w.r.t. the parameters.

    The parameters (all with ``requires_grad``, or those named in ``names``) are
    handled as one flat vector ``theta`` of length ``dim``.  Calling the object
    on ``v`` of shape (D,) or a stack (P, D) returns ``H v`` of the same shape.

    ``mode``: ``"fwd_rev"`` (``torch.func.jvp`` over ``grad``, vmapped over
    probes: the primal forward/backward is shared by all probes of a call),
    ``"double_backward"`` (gradient with ``create_graph`` computed once, one
    batched backward per call), or ``"auto"``: forward-over-reverse, falling back
    to double backward the first time forward-mode AD or vmap is unsupported.
    Attention runs on the math SDPA backend.  Needs eval mode (BatchNorm frozen).
    """

    def __init__(self, model, inputs, targets, loss_fn=None, names=None, mode: str = "auto"):
        if mode not in ("auto", "fwd_rev", "double_backward"):
            raise ValueError(f"mode must be 'auto', 'fwd_rev' or 'double_backward', got {mode!r}")
        require_eval(model)
        self.model, self.inputs, self.targets = model, inputs, targets
        self.loss_fn = _ce_mean if loss_fn is None else loss_fn
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if names is not None:
            wanted = set(names)
            unknown = wanted - {n for n, _ in named}
            if unknown:
                raise ValueError(f"unknown parameter names {sorted(unknown)}; see model.named_parameters()")
            named = [(n, p) for n, p in named if n in wanted]
        if not named:
            raise ValueError("no parameters with requires_grad to take the Hessian over")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.dim = self.theta.numel()
        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in set(self.names)}
        self._fixed = {**frozen, **dict(model.named_buffers())}
        self.mode = mode
        self._grad_graph = None

    def unflatten(self, vec: Tensor) -> dict:
        """Flat vector (D,) to ``{name: tensor}`` views with the parameters' shapes."""
        return {n: t.view(s) for n, t, s in zip(self.names, vec.split(self.numels), self.shapes)}

    def loss(self, theta: Tensor) -> Tensor:
        with _math_attention():
            out = torch.func.functional_call(self.model, (self.unflatten(theta), self._fixed), (self.inputs,))
        return self.loss_fn(out, self.targets)

    def _fwd_rev(self, v: Tensor) -> Tensor:
        def one(u):
            return torch.func.jvp(torch.func.grad(self.loss), (self.theta,), (u,))[1]

        with _math_attention():
            return torch.func.vmap(one)(v) if v.dim() == 2 else one(v)

    def _double_backward(self, v: Tensor) -> Tensor:
        if self._grad_graph is None:
            theta = self.theta.clone().requires_grad_(True)
            with torch.enable_grad(), _math_attention():
                g = torch.autograd.grad(self.loss(theta), theta, create_graph=True)[0]
            self._grad_graph = (theta, g)
        theta, g = self._grad_graph
        with _math_attention():
            if v.dim() == 1:
                return torch.autograd.grad(g, theta, v, retain_graph=True)[0]
            try:
                return torch.autograd.grad(g, theta, v, retain_graph=True, is_grads_batched=True)[0]
            except RuntimeError:  # an op without a batching rule: one probe at a time
                return torch.stack([torch.autograd.grad(g, theta, u, retain_graph=True)[0] for u in v])

    def __call__(self, v: Tensor) -> Tensor:
        if v.shape[-1] != self.dim or v.dim() not in (1, 2):
            raise ValueError(f"v must have shape ({self.dim},) or (P, {self.dim}), got {tuple(v.shape)}")
        v = v.to(self.theta)
        if self.mode == "double_backward":
            return self._double_backward(v)
        try:
            out = self._fwd_rev(v)
        except (RuntimeError, NotImplementedError):
            if self.mode == "fwd_rev":
                raise
            self.mode = "double_backward"
            return self._double_backward(v)
        if self.mode == "auto":
            self.mode = "fwd_rev"
        return out


def _rademacher(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = draw(lambda s, **kw: torch.randint(0, 2, s, **kw), shape, like.device, None, generator)
    return bits.to(like.dtype).mul_(2).sub_(1)


class TraceEstimate(NamedTuple):
    """Hutchinson estimate: ``mean`` (0-dim), its standard error ``stderr``, the per-probe ``samples`` (P,)."""

    mean: Tensor
    stderr: Tensor
    samples: Tensor


def hutchinson_trace(
    model,
    inputs: Tensor,
    targets: Tensor,
    n_probes: int = 100,
    chunk: int = 10,
    loss_fn=None,
    names=None,
    generator: torch.Generator | None = None,
    hvp: ParameterHVP | None = None,
) -> TraceEstimate:
    """Hutchinson estimate of ``Tr H`` of the loss over the parameters, Rademacher probes.

    ``chunk`` probes are pushed through one vmapped HVP at a time; everything stays
    on the device (no host sync).  The estimator's variance is
    ``2 (||H||_F^2 - sum_i H_ii^2) / n_probes``; ``stderr`` is its empirical value.
    Pass ``hvp`` to reuse an operator.  ``generator`` may live on any device.
    """
    if n_probes < 2 or chunk < 1:
        raise ValueError(f"need n_probes >= 2 and chunk >= 1, got {n_probes}, {chunk}")
    op = ParameterHVP(model, inputs, targets, loss_fn, names) if hvp is None else hvp
    samples = []
    done = 0
    while done < n_probes:
        c = min(chunk, n_probes - done)
        v = _rademacher((c, op.dim), op.theta, generator)
        samples.append((op(v) * v).sum(-1))
        done += c
    s = torch.cat(samples)
    return TraceEstimate(mean=s.mean(), stderr=s.std() / n_probes**0.5, samples=s)


def lanczos(matvec, dim: int, n_iter: int, like: Tensor, generator: torch.Generator | None = None):
    """Lanczos with full reorthogonalisation: ``(ritz_values (n,), ritz_vectors (n, dim))``, descending.

    ``matvec`` maps (dim,) to (dim,) for a symmetric operator; ``like`` gives the
    device and dtype.  ``n_iter`` is capped at ``dim``; with ``n_iter == dim`` the
    Ritz values are the exact spectrum.  Fixed iteration count, no host sync.
    """
    n_iter = min(n_iter, dim)
    q = draw(torch.randn, (dim,), like.device, like.dtype, generator)
    q = q / q.norm()
    basis = torch.zeros(n_iter, dim, device=like.device, dtype=like.dtype)
    alphas, betas = [], []
    for j in range(n_iter):
        basis[j] = q
        w = matvec(q)
        alpha = w @ q
        # two Gram-Schmidt passes against the whole basis keep it orthogonal in float32
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        if j + 1 < n_iter:
            beta = w.norm()
            betas.append(beta)
            q = w / beta.clamp_min(torch.finfo(like.dtype).tiny)
    t = torch.diag(torch.stack(alphas))
    if betas:
        b = torch.stack(betas)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    vals, vecs = torch.linalg.eigh(t)
    order = torch.argsort(vals, descending=True)
    return vals[order], (vecs[:, order].T @ basis)


def power_iteration_deflated(matvec, dim: int, k: int, n_iter: int, like: Tensor, generator=None):
    """Top-``k`` eigenpairs **by magnitude** by power iteration with deflation: ``(values (k,), vectors (k, dim))``."""
    vals, vecs = [], []
    for _ in range(k):
        v = draw(torch.randn, (dim,), like.device, like.dtype, generator)
        v = v / v.norm()
        lam = torch.zeros((), device=like.device, dtype=like.dtype)
        for _ in range(n_iter):
            w = matvec(v)
            for lj, qj in zip(vals, vecs):
                w = w - lj * (qj @ v) * qj
            lam = w @ v
            v = w / w.norm().clamp_min(torch.finfo(like.dtype).tiny)
        vals.append(lam)
        vecs.append(v)
    return torch.stack(vals), torch.stack(vecs)


def hessian_eigenvalues(
    model,
    inputs: Tensor,
    targets: Tensor,
    k: int = 1,
    method: str = "lanczos",
    n_iter: int = 30,
    loss_fn=None,
    names=None,
    generator: torch.Generator | None = None,
    hvp: ParameterHVP | None = None,
):
    """Top-``k`` eigenvalues and eigenvectors of the parameter Hessian: ``(values (k,), vectors (k, D))``.

    ``method="lanczos"``: the ``k`` algebraically largest Ritz pairs after ``n_iter``
    steps (memory ``n_iter * D``).  ``method="power"``: power iteration with
    deflation, ``n_iter`` steps per eigenvalue, largest in magnitude (as PyHessian).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    op = ParameterHVP(model, inputs, targets, loss_fn, names) if hvp is None else hvp
    if method == "lanczos":
        vals, vecs = lanczos(op, op.dim, max(n_iter, k), op.theta, generator)
        return vals[:k], vecs[:k]
    if method == "power":
        return power_iteration_deflated(op, op.dim, k, n_iter, op.theta, generator)
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")


# ---------------------------------------------------------------------------
# Input-space curvature (per sample)
