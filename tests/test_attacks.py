"""Tests of flatnb.attacks: budgets, box, agreement with torchattacks, APGD strength,
gradient masking by a scaled head, trajectory recording against independent references."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatnb import attacks
from flatnb.curvature import closed_form, kappa_from_hessian, last_layer_hessian_autograd
from flatnb.measure.trajectory import Recorder

K = 5
HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class TinyCNN(nn.Module):
    """Follows the flatnb model contract: features -> (N, m), head = final nn.Linear."""

    def __init__(self, channels: int = 1, k: int = K, m: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(72, m), nn.ReLU(),
        )
        self.head = nn.Linear(m, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class NoContract(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(36, K)

    def forward(self, x):
        return self.lin(x.flatten(1))


def make_data(n: int, seed: int):
    """Five noisy prototypes in [0, 1]^(1x6x6): separable, so a few seconds of training suffice."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(K, 1, 6, 6, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    y = torch.randint(0, K, (n,), generator=g)
    x = (protos[y] + 0.15 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    return x, y


def scaled(model: nn.Module, s: float) -> nn.Module:
    """Temperature scaling: head weight and bias times s (argmax unchanged)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.head.weight.mul_(s)
        out.head.bias.mul_(s)
    return out


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = make_data(1000, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set():
    return make_data(200, 100)


def inputs(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, K, (n,), generator=g)


def delta_norm(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


# ---------------------------------------------------------------------------
# Budget, box, eps = 0, robust <= clean
# ---------------------------------------------------------------------------


@HYP
@given(
    norm=st.sampled_from(attacks.NORMS),
    loss=st.sampled_from(attacks.LOSSES),
    eps=st.floats(0.0, 0.6),
    steps=st.integers(1, 5),
    random_start=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_pgd_budget_box_and_accuracy(untrained, norm, loss, eps, steps, random_start, seed):
    x, y = inputs(seed)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an untrained net may have dead-ReLU inputs
        r = attacks.pgd(untrained, x, y, eps, steps, norm=norm, loss=loss, random_start=random_start,
                        generator=gen)
    slack = 1e-6 * max(1.0, eps)
    for xa in (r.x_adv, r.x_last):
        assert (delta_norm(xa, x, norm) <= eps + slack).all()
        assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        pred_adv = untrained(r.x_adv).argmax(1)
        pred_clean = untrained(x).argmax(1)
    # success is what the model says at x_adv, and a clean mistake is never "repaired"
    assert torch.equal(r.success, pred_adv != y)
    assert torch.equal(r.clean_correct, pred_clean == y)
    assert ((pred_adv == y) <= (pred_clean == y)).all()
    assert r.robust_accuracy() <= r.clean_accuracy()


@HYP
@given(norm=st.sampled_from(attacks.NORMS), steps=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_apgd_budget_and_box(untrained, norm, steps, seed):
    x, y = inputs(seed)
    eps = 8 / 255 if norm == "linf" else 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = attacks.apgd(untrained, x, y, eps, norm=norm, steps=steps, generator=torch.Generator().manual_seed(seed))
    for xa in (r.x_adv, r.x_last):
        assert (delta_norm(xa, x, norm) <= eps + 1e-6).all()
        assert xa.min() >= 0 and xa.max() <= 1


@pytest.mark.parametrize("norm", attacks.NORMS)
@pytest.mark.parametrize("loss", attacks.LOSSES)
def test_eps_zero_returns_x(trained, test_set, norm, loss):
    x, y = test_set[0][:16], test_set[1][:16]
    runs = [
        attacks.pgd(trained, x, y, 0.0, 3, norm=norm, loss=loss),
        attacks.pgd(trained, x, y, 0.0, 3, norm=norm, loss=loss, random_start=True, restarts=2),
        attacks.fgsm(trained, x, y, 0.0, norm=norm, loss=loss),
    ]
    if loss in attacks.APGD_LOSSES:
        runs.append(attacks.apgd(trained, x, y, 0.0, norm=norm, loss=loss, steps=5))
    for r in runs:
        assert torch.equal(r.x_adv, x) and torch.equal(r.x_last, x)


# ---------------------------------------------------------------------------
# Agreement with torchattacks
# ---------------------------------------------------------------------------


@HYP
@given(
    eps=st.floats(0.0, 0.3),
    alpha_frac=st.floats(0.05, 1.0),
    steps=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    record=st.booleans(),
)
def test_pgd_linf_matches_torchattacks(untrained, eps, alpha_frac, steps, seed, record):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = inputs(seed)
    alpha = max(alpha_frac * eps, 1e-4)
    ref = torchattacks.PGD(untrained, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = attacks.pgd(untrained, x, y, eps, steps, alpha, record=Recorder if record else None)
    torch.testing.assert_close(ours.x_last, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_l2_and_fgsm_match_torchattacks(untrained, seed):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = inputs(seed, 16)
    ref = torchattacks.PGDL2(untrained, eps=0.5, alpha=0.1, steps=7, random_start=False)(x, y)
    ours = attacks.pgd(untrained, x, y, 0.5, 7, 0.1, norm="l2")
    torch.testing.assert_close(ours.x_last, ref, rtol=0, atol=1e-5)
    ref = torchattacks.FGSM(untrained, eps=8 / 255)(x, y)
    ours = attacks.fgsm(untrained, x, y, 8 / 255)
    torch.testing.assert_close(ours.x_last, ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# Strength: APGD vs PGD, gradient masking by a scaled head, transfer, targeted
# ---------------------------------------------------------------------------


def test_apgd_at_least_as_strong_as_pgd(trained, test_set):
    """Equal budget (50 gradient steps, random start for both); summed over an eps grid
    where robust accuracy is intermediate, and never more than 2 points worse at one eps."""
    x, y = test_set
    tot_apgd = tot_pgd = 0.0
    for eps in (0.08, 0.1, 0.12):
        g = torch.Generator().manual_seed(0)
        ra = attacks.apgd(trained, x, y, eps, steps=50, generator=g).robust_accuracy()
        rp = attacks.pgd(trained, x, y, eps, 50, random_start=True, generator=g).robust_accuracy()
        assert 0.0 < rp < 1.0  # the comparison is informative
        assert ra <= rp + 0.02
        tot_apgd += ra
        tot_pgd += rp
    assert tot_apgd <= tot_pgd


def test_scaled_head_masks_ce_gradients(trained, test_set):
    x, y = test_set
    big = scaled(trained, 100.0)
    eps = 0.2
    base = attacks.pgd(trained, x, y, eps, 20)
    assert base.n_zero_grad == 0
    assert base.robust_accuracy() < 0.1  # the unscaled model is not robust at this eps
    with pytest.warns(RuntimeWarning, match="zero input gradient"):
        ce = attacks.pgd(big, x, y, eps, 20)
    assert ce.n_zero_grad >= 0.8 * len(y)
    # the zero-gradient points are exactly those the attack cannot move
    assert torch.equal(ce.x_last[ce.zero_grad], x[ce.zero_grad])
    assert ce.robust_accuracy() >= ce.clean_accuracy() - 0.05  # CE-PGD "fails": masking
    for loss in ("cw", "dlr"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no zero gradients for the margin losses
            r = attacks.pgd(big, x, y, eps, 20, loss=loss)
        assert r.robust_accuracy() <= base.robust_accuracy() + 0.02
    # APGD-DLR too, and transfer from the unscaled model breaks the scaled one as well (E4)
    assert attacks.apgd(big, x, y, eps, loss="dlr", steps=20).robust_accuracy() <= base.robust_accuracy() + 0.02
    tr = attacks.transfer(base, y, big)
    assert torch.equal(tr.success, base.success)


def test_targeted_raises_target_probability(trained, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    t = (y + 1) % K
    for loss in attacks.LOSSES:
        r = attacks.pgd(trained, x, y, 0.1, 10, loss=loss, target=t)
        with torch.no_grad():
            p0 = torch.softmax(trained(x), 1).gather(1, t[:, None])[:, 0]
            p1 = torch.softmax(trained(r.x_adv), 1).gather(1, t[:, None])[:, 0]
        assert (p1 >= p0).all() and (p1 > p0).float().mean() > 0.9
        assert torch.equal(r.success, trained(r.x_adv).argmax(1) == t)
    r = attacks.apgd(trained, x, y, 0.1, loss="dlr", target=t, steps=20)
    with torch.no_grad():
        assert (trained(r.x_adv).argmax(1) == t).float().mean() >= (trained(x).argmax(1) == t).float().mean()


# ---------------------------------------------------------------------------
# Trajectory recording
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_trajectory_matches_recomputation(trained, test_set, attack):
    x, y = test_set[0][:24], test_set[1][:24]
    steps = 8
    if attack == "pgd":
        r = attacks.pgd(trained, x, y, 0.15, steps, record=Recorder, record_inputs=True)
    else:
        r = attacks.apgd(trained, x, y, 0.15, steps=steps, record=Recorder, record_inputs=True,
                         generator=torch.Generator().manual_seed(0))
    tr = r.trajectory
    assert tr.x.shape == (steps + 1,) + tuple(x.shape)
    assert tr.kappa_sq.shape == (steps + 1, len(y))
    w = trained.head.weight.detach()
    m64 = copy.deepcopy(trained).double()
    w64 = m64.head.weight.detach()
    for t in range(steps + 1):
        with torch.no_grad():
            phi = trained.features(tr.x[t])
            logits = trained.head(phi)
            phi64 = m64.features(tr.x[t].double())
            logits64 = m64.head(phi64)
        cf = closed_form(phi, logits, w)
        for name in ("kappa_sq", "kappa_unsq", "kappa_neuron", "phi_sq", "gini"):
            torch.testing.assert_close(getattr(tr, name)[t], getattr(cf, name), rtol=1e-5, atol=1e-7)
        # independent float64 reference: ||w||^2 (1 - ||p||^2) ||phi||^2 straight from the definition
        p64 = torch.softmax(logits64, 1)
        ref = w64.pow(2).sum() * (1 - p64.pow(2).sum(1)) * phi64.pow(2).sum(1)
        torch.testing.assert_close(tr.kappa_sq[t].double(), ref, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(tr.p_y[t].double(), p64.gather(1, y[:, None])[:, 0], rtol=1e-4, atol=1e-6)
        assert torch.equal(tr.pred[t], logits.argmax(1))
        torch.testing.assert_close(tr.delta_norm[t], delta_norm(tr.x[t], x, "linf"))
        if attack == "pgd":
            torch.testing.assert_close(tr.loss[t], F.cross_entropy(logits, y, reduction="none"), rtol=1e-5, atol=1e-6)
    # neuron-wise kappa against the literal double sum over a dense autograd Hessian (float64)
    for t in (0, steps):
        with torch.no_grad():
            phi64 = m64.features(tr.x[t][:3].double())
        hess = last_layer_hessian_autograd(phi64, y[:3], w64, m64.head.bias.detach())
        layer, neuron = kappa_from_hessian(hess, w64)
        torch.testing.assert_close(tr.kappa_neuron[t][:3].double(), neuron, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(tr.kappa_sq[t][:3].double(), layer, rtol=1e-3, atol=1e-9)
    # flip step: first recorded iterate whose prediction differs from y, -1 if none
    wrong = tr.pred != y
    expect = torch.where(wrong.any(0), wrong.int().argmax(0), torch.full_like(y, -1))
    assert torch.equal(tr.flip_step, expect) and torch.equal(r.flip_step, expect)
    assert (expect >= 0).any() and (expect > 0).any()
    # success: some recorded iterate (or the clean input) is misclassified
    assert torch.equal(r.success, wrong.any(0) | ~r.clean_correct)


def test_recording_reuses_the_forward_pass(trained, test_set):
    x, y = test_set[0][:16], test_set[1][:16]
    calls = {"n": 0}
    model = copy.deepcopy(trained)
    orig = model.features

    def counted(inp):
        calls["n"] += 1
        return orig(inp)

    model.features = counted
    counts = []
    for record in (None, Recorder):
        calls["n"] = 0
        attacks.pgd(model, x, y, 0.1, 6, record=record)
        counts.append(calls["n"])
    assert counts == [7, 7]  # x_0 .. x_6, one pass each, with or without recording


def test_early_stop_truncates_consistently(trained, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    r = attacks.pgd(trained, x, y, 0.4, 30, early_stop=True, check_every=2, record=Recorder)
    assert r.success.all()
    assert r.steps_run < 30 and r.steps_run % 2 == 0
    assert r.trajectory.loss.shape == (r.steps_run + 1, 32)
    full = attacks.pgd(trained, x, y, 0.4, 30, record=Recorder)
    torch.testing.assert_close(full.trajectory.loss[: r.steps_run + 1], r.trajectory.loss)


def test_bf16_autocast_keeps_loss_and_curvature_fp32(trained, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    r = attacks.pgd(trained, x, y, 0.1, 5, record=Recorder, autocast_dtype=torch.bfloat16)
    assert r.trajectory.kappa_sq.dtype == torch.float32 and r.loss_best.dtype == torch.float32
    assert (delta_norm(r.x_adv, x, "linf") <= 0.1 + 1e-6).all()
    ref = attacks.pgd(trained, x, y, 0.1, 5)
    assert abs(r.robust_accuracy() - ref.robust_accuracy()) <= 0.1


def test_model_mode_restored_and_eval_used(trained, test_set):
    model = copy.deepcopy(trained).train()
    model.body.insert(0, nn.Dropout(0.5))  # would make the attack random in train mode
    x, y = test_set[0][:16], test_set[1][:16]
    a = attacks.pgd(model, x, y, 0.1, 3)
    b = attacks.pgd(model, x, y, 0.1, 3)
    assert model.training
    assert torch.equal(a.x_adv, b.x_adv)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-0.1), "eps"),
        (dict(steps=0), "steps"),
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=-1.0), "step_size"),
        (dict(norm="l1"), "linf"),
        (dict(loss="hinge"), "dlr"),
        (dict(restarts=2), "random_start"),
    ],
)
def test_bad_arguments(untrained, kwargs, match):
    x, y = inputs(0)
    args = dict(eps=0.1, steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attacks.pgd(untrained, x, y, **args)


def test_bad_inputs(untrained):
    x, y = inputs(0)
    with pytest.raises(ValueError, match=r"\[0, 1\]|clip"):
        attacks.pgd(untrained, x * 2 - 0.5, y, 0.1, 2)
    r = attacks.pgd(untrained, x * 2 - 0.5, y, 0.1, 2, clip=None)  # the caller lifts the box
    assert (delta_norm(r.x_adv, x * 2 - 0.5, "linf") <= 0.1 + 1e-6).all()
    with pytest.raises(ValueError, match="same N"):
        attacks.pgd(untrained, x, y[:-1], 0.1, 2)
    with pytest.raises(ValueError, match="loss"):
        attacks.apgd(untrained, x, y, 0.1, loss="cw")
    with pytest.raises(ValueError, match="norm"):
        attacks.apgd(untrained, x, y, 0.1, norm="linfinity")
    with pytest.raises(ValueError, match="differ"):
        attacks.pgd(untrained, x, y, 0.1, 2, target=y)
    with pytest.raises(TypeError, match="contract"):
        attacks.pgd(NoContract(), x, y, 0.1, 2)
    two = TinyCNN(k=2).eval()
    with pytest.raises(ValueError, match="3 classes"):
        attacks.pgd(two, x, y % 2, 0.1, 2, loss="dlr")


def test_float64_model_is_attacked_in_float64():
    """A margin of ~300 underflows the CE gradient in float32 but not in float64 (PAPER §3)."""

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[300.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
                self.head.bias.zero_()

        def features(self, x):
            return x.flatten(1)

        def forward(self, x):
            return self.head(self.features(x))

    x = torch.tensor([[1.0, 0.5, 0.5, 0.5]])
    y = torch.tensor([0])
    with pytest.warns(RuntimeWarning):
        r32 = attacks.pgd(Linear(), x, y, eps=0.1, steps=2, step_size=0.05)
    r64 = attacks.pgd(Linear().double(), x.double(), y, eps=0.1, steps=2, step_size=0.05)
    assert r32.n_zero_grad == 1 and r64.n_zero_grad == 0
    # the loss value itself rounds to 0 in both precisions; its gradient p - e_y does not in float64
    assert r64.loss_final.dtype == torch.float64
    assert (r64.x_last - x.double()).abs().max() > 0  # the float64 attack moves, the float32 one cannot
    assert torch.equal(r32.x_last, x)


def test_callable_loss_is_the_named_loss_when_it_computes_the_same(trained, test_set):
    """A callable ``loss(phi, logits, y, target)`` that computes CE gives PGD's CE run exactly; one that reads
    ``phi`` sees the features of the iterate's own pass; a wrong shape or a non-callable is refused."""
    x, y = test_set[0][:32], test_set[1][:32]
    seen = []

    def ce_from_phi(phi, logits, y, target):
        seen.append(torch.allclose(logits, trained.head(phi)))
        return F.cross_entropy(logits, y, reduction="none")

    a = attacks.pgd(trained, x, y, 0.1, steps=5)
    b = attacks.pgd(trained, x, y, 0.1, steps=5, loss=ce_from_phi)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert torch.equal(a.loss_best, b.loss_best) and len(seen) == 6 and all(seen)
    # a loss that rewards a small feature norm drives ||phi|| down, unlike CE
    small = attacks.pgd(trained, x, y, 0.1, steps=5, loss=lambda phi, z, y, t: -phi.pow(2).sum(1))
    with torch.no_grad():
        assert trained.features(small.x_last).pow(2).sum(1).mean() < trained.features(x).pow(2).sum(1).mean()
    with pytest.raises(ValueError, match="one value per example"):
        attacks.pgd(trained, x, y, 0.1, steps=2, loss=lambda phi, z, y, t: z)
    with pytest.raises(ValueError, match="loss must be one of"):
        attacks.pgd(trained, x, y, 0.1, steps=2, loss=3)
    with pytest.raises(ValueError, match="PGD option"):
        attacks.apgd(trained, x, y, 0.1, steps=2, loss=ce_from_phi)
