"""Relative flatness of the penultimate layer: closed forms and exact references.

Notation follows ``PAPER.md``: features ``phi`` (N x m), last-layer weight ``w``
(k x m, rows ``w_s``), logits ``z = w phi + b``, probabilities ``p``.  For softmax
cross-entropy the Hessian of the loss w.r.t. row-major ``vec(w)`` is

    H = (diag(p) - p p^T)  kron  phi phi^T,

independent of the label, so every quantity below is a cheap function of
``(phi, p, w)``.  The bias is not part of ``w``: curvature is taken w.r.t. the
weight matrix only and ``||w||`` is the weight's norm (as in the Uncanny Valley
code and Petzka et al.).

Functions are batched over samples (leading dimension N) and keep the device
and dtype of their inputs.  The ``*_autograd`` / ``*_from_hessian`` functions
are independent references used by tests and chapters to check the closed forms.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flatnb.models import check_contract
from flatnb.runtime import draw

Tensor = torch.Tensor


def _check_probs(probs: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, k), got {tuple(probs.shape)}")


def _check_phi(phi: Tensor) -> None:
    if phi.dim() != 2:
        raise ValueError(f"phi must have shape (N, m), got {tuple(phi.shape)}")


def _check_weight(weight: Tensor, k: int | None = None, m: int | None = None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (k, m), got {tuple(weight.shape)}")
    if k is not None and weight.shape[0] != k:
        raise ValueError(f"weight has {weight.shape[0]} rows but probs has {k} classes")
    if m is not None and weight.shape[1] != m:
        raise ValueError(f"weight has {weight.shape[1]} columns but phi has {m} features")


def softmax_hessian(probs: Tensor) -> Tensor:
    """``M(p) = diag(p) - p p^T`` per sample: the CE Hessian in the logits, (N, k, k)."""
    _check_probs(probs)
    return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)


def gini(probs: Tensor) -> Tensor:
    """``1 - ||p||^2 = sum_j p_j (1 - p_j)`` per sample, (N,).

    Computed without cancellation: for the most likely class ``1 - p_max`` is
    taken as the sum of the other probabilities, so a confidently classified
    input (``p_max = 1 - 1e-20``) still gets a correct, tiny value in float32
    instead of 0 or rounding noise.  This is the regime the uncanny valley lives in.
    """
    _check_probs(probs)
    top = probs.argmax(dim=-1, keepdim=True)
    rest = probs.scatter(-1, top, 0.0).sum(dim=-1, keepdim=True)
    one_minus = (1.0 - probs).scatter(-1, top, rest)
    return (probs * one_minus).sum(dim=-1)


def trace_hessian(phi: Tensor, probs: Tensor) -> Tensor:
    """Per-sample ``Tr H = (1 - ||p||^2) ||phi||^2``, (N,)."""
    _check_phi(phi)
    _check_probs(probs)
    return gini(probs) * phi.pow(2).sum(dim=-1)


def weight_norm(weight: Tensor, squared: bool = True) -> Tensor:
    """Frobenius norm of the last-layer weight (bias excluded), squared or not."""
    sq = weight.pow(2).sum()
    return sq if squared else sq.sqrt()


def kappa_layerwise(phi: Tensor, probs: Tensor, weight: Tensor, squared: bool = True) -> Tensor:
    """Layer-wise relative flatness per sample, (N,).

    ``squared=True``: ``||w||_F^2 Tr H`` (Petzka et al. supplement, the paper's text);
    ``squared=False``: ``||w||_F Tr H`` (the Uncanny Valley code and plots).
    Only the squared version is invariant to ``phi -> c phi, w -> w / c``.
    """
    _check_weight(weight, probs.shape[-1], phi.shape[-1])
    return weight_norm(weight, squared) * trace_hessian(phi, probs)


def class_distances(weight: Tensor) -> Tensor:
    """``D[s, s'] = ||w_s - w_s'||^2`` (k, k), computed exactly (no Gram-matrix trick)."""
    return torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def kappa_neuronwise(phi: Tensor, probs: Tensor, weight: Tensor, distances: Tensor | None = None) -> Tensor:
    """Neuron-wise relative flatness ``kappa^phi_Tr`` per sample, (N,).

    ``kappa = ||phi||^2 (sum_s p_s ||w_s||^2 - ||sum_s p_s w_s||^2)
            = ||phi||^2 Var_{s~p}(w_s)
            = ||phi||^2 * 1/2 sum_{s,s'} p_s p_s' ||w_s - w_s'||^2``.

    The last form has only non-negative terms, so it stays accurate when ``p`` is
    nearly one-hot (the first form then subtracts two nearly equal numbers).
    Pass ``distances=class_distances(weight)`` to reuse it across batches.
    """
    _check_phi(phi)
    _check_probs(probs)
    _check_weight(weight, probs.shape[-1], phi.shape[-1])
    d = class_distances(weight) if distances is None else distances
    var = 0.5 * ((probs @ d.to(probs.dtype)) * probs).sum(dim=-1)
    return phi.pow(2).sum(dim=-1) * var


class FlatnessTerms(NamedTuple):
    """Per-sample closed-form quantities, each of shape (N,), plus ``||w||^2`` (scalar)."""

    phi_sq: Tensor  # ||phi(x)||^2
    gini: Tensor  # 1 - ||p||^2
    trace_h: Tensor  # Tr H = gini * phi_sq
    weight_sq: Tensor  # ||w||_F^2 (scalar)
    kappa_sq: Tensor  # ||w||_F^2 Tr H
    kappa_unsq: Tensor  # ||w||_F Tr H
    kappa_neuron: Tensor  # neuron-wise kappa^phi_Tr


def closed_form(phi: Tensor, logits: Tensor, weight: Tensor, distances: Tensor | None = None) -> FlatnessTerms:
    """All closed-form flatness quantities from one forward pass' ``phi`` and ``logits``."""
    _check_phi(phi)
    if logits.dim() != 2 or logits.shape[0] != phi.shape[0]:
        raise ValueError(f"logits must have shape (N, k) with N={phi.shape[0]}, got {tuple(logits.shape)}")
    _check_weight(weight, logits.shape[-1], phi.shape[-1])
    probs = torch.softmax(logits, dim=-1)
    phi_sq = phi.pow(2).sum(dim=-1)
    g = gini(probs)
    tr = g * phi_sq
    w_sq = weight_norm(weight, squared=True).to(tr.dtype)
    return FlatnessTerms(
        phi_sq=phi_sq,
        gini=g,
        trace_h=tr,
        weight_sq=w_sq,
        kappa_sq=w_sq * tr,
        kappa_unsq=w_sq.sqrt() * tr,
        kappa_neuron=kappa_neuronwise(phi, probs, weight, distances),
    )


def last_layer_hessian(phi: Tensor, probs: Tensor) -> Tensor:
    """Closed-form per-sample Hessian w.r.t. row-major ``vec(w)``, (N, k*m, k*m).

    Dense, so only for small ``k * m``; the other functions never build it.
    """
    _check_phi(phi)
    m_mat = softmax_hessian(probs)
    outer = phi.unsqueeze(-1) * phi.unsqueeze(-2)
    n, k, m = probs.shape[0], probs.shape[1], phi.shape[1]
    return (m_mat[:, :, None, :, None] * outer[:, None, :, None, :]).reshape(n, k * m, k * m)


# ---------------------------------------------------------------------------
# Independent references (autograd, the double-sum definition)
# ---------------------------------------------------------------------------


def last_layer_hessian_autograd(phi: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Exact per-sample Hessian of the CE loss w.r.t. ``vec(w)`` by autograd, (N, k*m, k*m).

    One ``torch.autograd.functional.hessian`` call per sample: slow and obviously
    correct, which is what a reference should be.
    """
    _check_phi(phi)
    _check_weight(weight, m=phi.shape[1])
    k, m = weight.shape
    w0 = weight.detach().reshape(-1)
    b0 = None if bias is None else bias.detach()
    out = []
    for i in range(phi.shape[0]):
        phi_i = phi[i].detach()
        y_i = labels[i].reshape(1)

        def loss(w_flat: Tensor, phi_i=phi_i, y_i=y_i) -> Tensor:
            z = w_flat.reshape(k, m) @ phi_i
            if b0 is not None:
                z = z + b0
            return F.cross_entropy(z.unsqueeze(0), y_i)

        out.append(torch.autograd.functional.hessian(loss, w0))
    return torch.stack(out)


def kappa_from_hessian(hessian: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(||w||^2 Tr H, sum_{s,s'} <w_s, w_s'> Tr H_{s,s'})`` from dense Hessians.

    ``hessian`` is (N, k*m, k*m) or (k*m, k*m) over row-major ``vec(w)``; the
    neuron-wise value follows Petzka et al.'s double-sum definition literally.
    """
    squeeze = hessian.dim() == 2
    h = hessian.unsqueeze(0) if squeeze else hessian
    k, m = weight.shape
    blocks = h.reshape(h.shape[0], k, m, k, m)
    block_traces = torch.diagonal(blocks, dim1=2, dim2=4).sum(-1)  # (N, k, k): Tr H_{s,s'}
    gram = weight @ weight.T
    neuron = (gram.unsqueeze(0) * block_traces).sum(dim=(-1, -2))
    layer = weight.pow(2).sum() * torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)
    if squeeze:
        return layer[0], neuron[0]
    return layer, neuron


def last_layer_hessian_batch(phi: Tensor, probs: Tensor) -> Tensor:
    """Closed-form Hessian of the *mean* loss over the batch, ``H(w, S)``, (k*m, k*m).

    ``H(w, S) = 1/N sum_i M(p_i) kron phi_i phi_i^T`` (PAPER.md §3 item 6).  Dense.
    """
    _check_phi(phi)
    _check_probs(probs)
    m_mat = softmax_hessian(probs)
    k, m = probs.shape[1], phi.shape[1]
    h = torch.einsum("nab,ni,nj->aibj", m_mat, phi, phi) / phi.shape[0]
    return h.reshape(k * m, k * m)


def last_layer_hessian_batch_autograd(
    phi: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Exact Hessian of the batch-mean CE loss w.r.t. ``vec(w)`` by one autograd call, (k*m, k*m)."""
    _check_phi(phi)
    _check_weight(weight, m=phi.shape[1])
    if labels.shape != (phi.shape[0],):
        raise ValueError(f"labels must have shape ({phi.shape[0]},), got {tuple(labels.shape)}")
    k, m = weight.shape
    phi0 = phi.detach()
    b0 = None if bias is None else bias.detach()

    def loss(w_flat: Tensor) -> Tensor:
        z = phi0 @ w_flat.reshape(k, m).T
        if b0 is not None:
            z = z + b0
        return F.cross_entropy(z, labels)

    return torch.autograd.functional.hessian(loss, weight.detach().reshape(-1))


# ---------------------------------------------------------------------------
# The closed form on a model (one forward pass), streamed over a loader
# ---------------------------------------------------------------------------

# The model contract is owned by flatnb.models; kept under this name for callers of flatness.
check_model_contract = check_contract


def _require_eval(model: torch.nn.Module) -> None:
    """BatchNorm / dropout in training mode couple samples or add noise: curvature needs eval mode."""
    for name, mod in model.named_modules():
        if mod.training and isinstance(mod, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
            raise ValueError(
                f"module {name or type(mod).__name__} ({type(mod).__name__}) is in training mode; "
                "curvature and flatness are defined for the frozen network: call model.eval() first"
            )


def _raise_nonfinite(what: str) -> None:
    raise FloatingPointError(
        f"{what} contain NaN or inf, so flatness would be NaN; check the inputs (pixels in [0,1]), "
        "the weights, or use dtype=torch.float64 for extreme weight scales"
    )


def model_flatness(
    model: torch.nn.Module, x: Tensor, distances: Tensor | None = None, check: bool = True
) -> tuple[FlatnessTerms, Tensor]:
    """Closed-form flatness of one batch from a single forward pass: ``(terms, logits)``.

    ``phi = model.features(x)``, ``logits = model.head(phi)``; nothing else is run,
    so the cost is one forward pass plus O(N k m) work.  ``check=True`` raises on
    non-finite logits (one host sync); :func:`flatness_over` defers that check.
    """
    phi = model.features(x)
    if phi.dim() != 2:
        raise ValueError(f"model.features(x) must return (N, m) features, got {tuple(phi.shape)}")
    logits = model.head(phi)
    if check and not bool(torch.isfinite(logits).all()):
        _raise_nonfinite("logits")
    return closed_form(phi, logits, model.head.weight, distances), logits


class FlatnessOver(NamedTuple):
    """Result of :func:`flatness_over`.

    ``terms``: per-sample :class:`FlatnessTerms` over the whole loader (each (N,),
    ``weight_sq`` a scalar).  ``mean``: dataset averages of every per-sample term
    (0-dim tensors on the device).  Because ``H(w, S)`` is the mean of the
    per-sample Hessians and every kappa is linear in ``H``, ``mean["trace_h"]`` is
    ``Tr H(w, S)`` and ``mean["kappa_*"]`` are the dataset-level kappas.
    ``pred`` (N,), and, when the loader yields labels, ``labels``, ``loss`` (N,)
    and ``mean["loss"]``, ``mean["accuracy"]``.
    """

    terms: FlatnessTerms
    mean: dict
    pred: Tensor
    labels: Tensor | None
    loss: Tensor | None


def flatness_over(
    model: torch.nn.Module,
    batches,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FlatnessOver:
    """Closed-form flatness over a loader: one forward pass per batch, no second pass.

    ``batches`` yields input tensors or ``(x, y, ...)`` tuples.  ``device`` defaults
    to the model's; ``dtype`` (default: the model's) is the computation dtype: a
    copy of the model is cast if it differs, the model itself is never changed.
    Per-sample values stay on the device; the only host sync is one finite-check
    at the end (NaN/inf logits raise ``FloatingPointError``).  The bias enters the
    logits but not ``w``: curvature and ``||w||`` are w.r.t. the weight matrix.
    """
    check_model_contract(model)
    _require_eval(model)
    p0 = next(model.parameters())
    device = p0.device if device is None else torch.device(device)
    dtype = p0.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    if p0.device != device or p0.dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    distances = class_distances(model.head.weight.detach())
    parts: dict[str, list[Tensor]] = {f: [] for f in FlatnessTerms._fields if f != "weight_sq"}
    preds, labels, losses = [], [], []
    finite = torch.ones((), dtype=torch.bool, device=device)
    with torch.no_grad():
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.to(device=device, dtype=dtype, non_blocking=True)
            terms, logits = model_flatness(model, x, distances, check=False)
            finite &= torch.isfinite(logits).all()
            for f in parts:
                parts[f].append(getattr(terms, f))
            preds.append(logits.argmax(-1))
            if y is not None:
                y = y.to(device, non_blocking=True)
                labels.append(y)
                losses.append(F.cross_entropy(logits, y, reduction="none"))
    if not preds:
        raise ValueError("batches was empty: pass a loader (or list) yielding at least one batch")
    if not bool(finite):
        _raise_nonfinite("logits")
    cat = {f: torch.cat(v) for f, v in parts.items()}
    terms = FlatnessTerms(weight_sq=weight_norm(model.head.weight.detach()).to(dtype), **cat)
    mean = {f: v.mean() for f, v in cat.items()}
    pred = torch.cat(preds)
    lab = loss = None
    if labels:
        if len(labels) != len(preds):
            raise ValueError("some batches had labels and some did not")
        lab, loss = torch.cat(labels), torch.cat(losses)
        mean["loss"] = loss.mean()
        mean["accuracy"] = (pred == lab).to(dtype).mean()
    return FlatnessOver(terms=terms, mean=mean, pred=pred, labels=lab, loss=loss)


# ---------------------------------------------------------------------------
# Full-network curvature from Hessian-vector products
# ---------------------------------------------------------------------------


def _math_attention():
    """Force the math SDPA backend: flash / memory-efficient kernels have no double
    backward and no forward-mode AD (PAPER.md §6.9)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _ce_mean(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets)


def _ce_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="sum")


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
        _require_eval(model)
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
    """
    _require_eval(model)
    _check_xy(x, y)
    return torch.func.grad(_input_loss(model, y, loss_fn))(x.detach())


def input_gradient_norm(model, x: Tensor, y: Tensor, loss_fn=None) -> Tensor:
    """Per-sample ``||grad_x loss||_2``, (N,)."""
    return input_gradient(model, x, y, loss_fn).flatten(1).norm(dim=1)


def input_hvp(model, x: Tensor, y: Tensor, v: Tensor, loss_fn=None) -> Tensor:
    """Per-sample input Hessian-vector product ``(grad_x^2 loss_i) v_i``, same shape as ``x``.

    Forward-over-reverse; double backward where forward-mode AD is unsupported.
    """
    _require_eval(model)
    _check_xy(x, y)
    if v.shape != x.shape:
        raise ValueError(f"v must have the inputs' shape {tuple(x.shape)}, got {tuple(v.shape)}")
    f = _input_loss(model, y, loss_fn)
    x0, v = x.detach(), v.to(x)
    try:
        with _math_attention():
            return torch.func.jvp(torch.func.grad(f), (x0,), (v,))[1]
    except (RuntimeError, NotImplementedError):
        xr = x0.clone().requires_grad_(True)
        with torch.enable_grad(), _math_attention():
            g = torch.autograd.grad(f(xr), xr, create_graph=True)[0]
            return torch.autograd.grad(g, xr, v)[0]


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


def neighbour_directions(x: Tensor, y: Tensor, pool_x: Tensor, pool_y: Tensor) -> Tensor:
    """Unit direction from each ``x_i`` to its nearest same-class point of the pool (itself excluded)."""
    _check_xy(x, y)
    dist = torch.cdist(x.flatten(1), pool_x.flatten(1).to(x))
    dist = dist.masked_fill(pool_y.to(y.device)[None, :] != y[:, None], float("inf"))
    dist = dist.masked_fill(dist == 0, float("inf"))
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
    _require_eval(model)
    _check_xy(x, y)
    if direction.shape != x.shape:
        raise ValueError(f"direction must have the inputs' shape {tuple(x.shape)}, got {tuple(direction.shape)}")
    fn = loss_fn or (lambda z, t: F.cross_entropy(z, t, reduction="none"))
    d = direction.to(x)
    base = fn(model(x), y)
    return torch.stack([fn(model(x + float(t) * d), y) - base for t in ts])
