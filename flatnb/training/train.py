"""Training: the loop, the shared checkpoint cache, and evaluation.

Recipes (Walter et al. 2026 §5; the configurations are one explicit table, :mod:`flatnb.config.recipes`):
``standard``, ``pgd_at`` (ℓ∞ PGD-AT, loss ``α·CE(clean) + (1-α)·CE(adv)``) and ``trades`` (β = 6);
label smoothing, SAM and mixup are off unless a recipe asks (they change confidence, hence κ).
Checkpoints live in ``cache_dir()/checkpoints``, keyed by a hash of the :class:`TrainConfig` and the
training data's digest; written atomically every epoch, resumed after an interruption (bit-identical
on the CPU), moved aside and retrained when corrupt. Precision (:func:`select_precision`, recorded in
``model.train_info["precision"]``): bf16 autocast + channels_last + fused SGD on CUDA (fp16 with a
gradient scaler where bf16 is missing), float32 on the CPU unless the config sets ``cpu_bf16``; the
returned model is float32, so curvature and attacks run in float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock

from flatnb import data as fdata
from flatnb import models as fmodels
from flatnb.config import recipes
from flatnb.config.train_config import RECIPES, TrainConfig  # noqa: F401 - RECIPES, TrainConfig: this module's API too
from flatnb.models.weights import read_checkpoint
from flatnb.runtime import atomic_save, cache_dir, resolve_device, resolve_profile
from flatnb.training.optim import Lookahead, lr_lambda, optimizer, plain_state, select_precision

def config_for(arch: str, dataset: str, recipe: str = "standard", profile: str = "quick", seed: int = 0) -> TrainConfig:
    """The configuration of ``(arch, dataset, recipe)`` in ``profile`` ("quick" or "full"), read from
    the table :data:`flatnb.config.recipes.TABLE` with ``seed`` filled in. ``arch="main"`` is the profile's
    main model (:data:`flatnb.config.recipes.MAIN`). Resolve ``profile="auto"`` first with
    :func:`flatnb.runtime.resolve_profile` (or call :func:`trained_model`, which does)."""
    return recipes.lookup(arch, dataset, recipe, profile, seed)


# ----------------------------------------------------------------------------- pieces

def build_model(config: TrainConfig) -> nn.Module:
    """The untrained model of ``config`` (seeded init), normalising with the dataset's statistics."""
    mean, std = fdata.MEAN_STD[config.dataset]
    kw = dict(config.model_kw)
    if config.width is not None:
        kw["width"] = config.width
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's global RNG
        torch.manual_seed(config.seed)
        return fmodels.build(config.arch, config.n_classes, image_size=config.image_size, mean=mean, std=std, **kw)


def training_data(config: TrainConfig, root=None) -> fdata.Dataset:
    ds = fdata.load(config.dataset, "train", root=root)
    if config.num_classes is not None or config.n_train is not None:
        ds = fdata.subset(ds, n=config.n_train, seed=config.seed, num_classes=config.num_classes)
    return ds


def test_data(config: TrainConfig, root=None) -> fdata.Dataset:
    """The test split matching ``config`` (same class subset)."""
    ds = fdata.load(config.dataset, "test", root=root)
    if config.num_classes is not None:
        ds = fdata.subset(ds, num_classes=config.num_classes)
    return ds


def _noise(fn, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``fn(x.shape)`` on ``x``'s device, seeded from the CPU ``generator``. On the CPU it draws from
    ``generator`` itself; on a GPU from a device generator seeded by one CPU draw, so no image-sized
    host-to-device copy (which waits for the queued kernels) happens per training step."""
    if x.device.type == "cpu":
        return fn(x.shape, generator=generator, dtype=x.dtype)
    g = torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return fn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _pgd_linf(model, x, y, eps, step, steps, random_start, generator, loss_fn=None):
    """Minimal ℓ∞ PGD for training (flatnb.attacks is the public one): signed steps on
    ``loss_fn(model(x_adv), y)`` (default CE), projected onto the ε-ball and [0, 1]."""
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t))
    x_adv = x.detach().clone()
    if random_start:
        noise = _noise(torch.rand, x, generator) * 2 - 1
        x_adv = (x_adv + eps * noise).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def _loss(model, x, y, config: TrainConfig, generator, autocast):
    """Training loss and logits of the recipe (logits for the running accuracy)."""
    if config.recipe == "standard":
        if config.mixup_alpha > 0:  # mixup (Zhang et al. 2018): one Beta(α, α) weight and one pairing per batch
            lam = _beta(config.mixup_alpha, generator)
            perm = torch.randperm(len(y), generator=generator).to(x.device)
            with autocast():
                logits = model(lam * x + (1 - lam) * x[perm])
                lf = _train_logits(logits.float(), config)
                loss = lam * F.cross_entropy(lf, y, label_smoothing=config.label_smoothing) + \
                    (1 - lam) * F.cross_entropy(lf, y[perm], label_smoothing=config.label_smoothing)
                return loss, logits
        with autocast():
            logits = model(x)
            return F.cross_entropy(_train_logits(logits.float(), config), y,
                                   label_smoothing=config.label_smoothing), logits
    if config.recipe == "pgd_at":
        model.eval()  # frozen BN statistics while crafting (as in most AT code)
        with autocast():
            x_adv = _pgd_linf(model, x, y, config.eps, config.pgd_step_size, config.pgd_steps,
                              config.pgd_random_start, generator)
        model.train()
        with autocast():
            logits_adv = model(x_adv)
            loss = F.cross_entropy(logits_adv.float(), y, label_smoothing=config.label_smoothing)
            if config.at_alpha > 0:
                loss = config.at_alpha * F.cross_entropy(model(x).float(), y) + (1 - config.at_alpha) * loss
            return loss, logits_adv
    # TRADES (Zhang et al. 2019): CE(clean) + β·KL(p(x) || p(x_adv)), x_adv maximises the KL
    model.eval()
    with autocast():
        p_clean = F.softmax(model(x).float(), 1).detach()
        kl = lambda logits, _t: F.kl_div(F.log_softmax(logits.float(), 1), p_clean, reduction="batchmean")
        x0 = (x + 0.001 * _noise(torch.randn, x, generator)).clamp(0, 1)
        x_adv = _pgd_linf(model, x0, y, config.eps, config.pgd_step_size, config.pgd_steps, False, generator, kl)
        x_adv = torch.min(torch.max(x_adv, x - config.eps), x + config.eps)
    model.train()
    with autocast():
        logits = model(x)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing) + config.trades_beta * F.kl_div(
            F.log_softmax(logits_adv.float(), 1), F.softmax(logits.float(), 1), reduction="batchmean")
        return loss, logits


def _train_logits(logits: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The logits the standard loss sees: ``z / (τ‖z‖)`` under LogitNorm (Wei et al. 2022, τ =
    ``config.logit_norm`` > 0; the norm over classes, per input, with 1e-7 against a zero vector), else ``z``."""
    if config.logit_norm <= 0:
        return logits
    return logits / (config.logit_norm * (logits.norm(dim=1, keepdim=True) + 1e-7))


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(α, α) draw seeded from ``generator`` (so a resumed run draws the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return float(torch.distributions.Beta(alpha, alpha).sample())


def checkpoint_path(config: TrainConfig, data_digest: str) -> Path:
    c = config
    return cache_dir() / "checkpoints" / f"{c.arch}-{c.dataset}-{c.recipe}-{c.profile}-s{c.seed}-{c.key(data_digest)}.pt"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


# ----------------------------------------------------------------------------- training

@contextlib.contextmanager
def _training_lock(ckpt: Path, enabled: bool = True):
    """An exclusive lock next to the checkpoint (``<ckpt>.lock``, :class:`filelock.FileLock`): one process
    trains a config, another waits for it and then loads the checkpoint it wrote."""
    if not enabled:
        yield
        return
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ckpt.with_name(ckpt.name + ".lock"))):
        yield


def train(config: TrainConfig, device=None, root=None, train_ds: fdata.Dataset | None = None,
          callback: Callable[[int, dict], None] | None = None, progress: bool | None = None,
          use_cache: bool = True, check_every: int = 25, compile: bool = False,
          eval_ds: fdata.Dataset | None = None, snapshots=()) -> nn.Module:
    """Train ``config`` on ``device`` (resuming from its checkpoint) and return the model in eval mode.

    ``train_ds`` overrides the training data (default: :func:`training_data`).
    ``callback(epoch, metrics)`` runs after each epoch's checkpoint is written
    (raising in it interrupts the run; the next call resumes). ``use_cache=False``
    neither reads nor writes checkpoints. Non-finite loss raises
    :class:`NonFiniteLossError` naming the epoch and step (checked every
    ``check_every`` steps to avoid a host sync per step).

    ``progress``: ``True`` shows tqdm bars and a line per epoch, ``False`` nothing,
    ``None`` (default) the epoch lines always and the bars unless the environment
    sets ``FLATNB_PROGRESS=0`` (headless chapter runs do: a text-mode bar would
    write hundreds of lines into the executed notebook).

    ``eval_ds``: evaluated after every epoch (float32), its accuracy goes into the epoch's
    metrics as ``test_acc`` (with ``train_s``, the training wall time of the epoch).

    ``snapshots``: epochs k (1-based, before the last) after which the weights are also written, as a finished
    checkpoint, for ``dataclasses.replace(config, stop_epochs=k)``: the early-stopped checkpoints of this very
    run (the same schedule; :attr:`TrainConfig.stop_epochs`), which a later ``train`` of that configuration
    then loads instead of training the first k epochs again. Needs the checkpoint cache (``use_cache``).

    ``compile=True`` trains through :func:`torch.compile` (same recipe; pays a compile time up
    front). The precision, memory format, optimizer kind and compile choice are stored in
    ``model.train_info["precision"]`` (:func:`select_precision`).
    """
    snapshots = sorted({int(k) for k in snapshots})
    if snapshots and (config.stop_epochs or not use_cache or not 1 <= snapshots[0] or
                      snapshots[-1] >= config.last_epoch):
        raise ValueError(f"snapshots must be epochs in [1, {config.last_epoch - 1}] of a whole run with the "
                         f"checkpoint cache on, got {snapshots} (stop_epochs={config.stop_epochs}, "
                         f"use_cache={use_cache})")
    bars = progress if progress is not None else os.environ.get("FLATNB_PROGRESS", "1") != "0"
    # tqdm.auto warns about missing ipywidgets on import in a bare kernel: only import it for bars
    if bars:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    epoch_lines = progress is not False

    device = resolve_device(device)
    ds = train_ds if train_ds is not None else training_data(config, root)
    model = build_model(config).to(device)
    prec = select_precision(device, config, compile=compile)
    if hasattr(model, "init_whitening"):  # FastNet: whitening filters from the first 2,000 training images
        model.init_whitening(ds.images[:2000].float().div(255))
    opt = optimizer(model, config, fused=prec["fused_sgd"])
    loader = fdata.Loader(ds, config.batch_size, device, shuffle=True, augment=config.augment,
                          seed=config.seed, drop_last=len(ds) >= 2 * config.batch_size,
                          pad=config.crop_pad, pad_mode=config.crop_mode)
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config, steps))
    ckpt = checkpoint_path(config, ds.digest)
    # One process trains a given configuration at a time; another one waits here and then
    # resumes from (or simply loads) what the first one wrote.
    with _training_lock(ckpt, use_cache):
        start, history = 0, []
        state = read_checkpoint(ckpt, device, model) if use_cache and ckpt.exists() else None
        if state is not None:
            model.load_state_dict(state["model"])
            if state.get("done"):
                model.eval()
                model.train_info = state.get("info", {})
                return model
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, history = state["epoch"] + 1, state["history"]

        if prec["channels_last"]:  # in place: the optimizer keeps the same parameter objects
            model = model.to(memory_format=torch.channels_last)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec["autocast"])

        def autocast():
            return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

        scaler = torch.amp.GradScaler(device.type) if prec["grad_scaler"] else None
        if scaler is not None and use_cache and ckpt.exists() and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        lookahead = Lookahead(model) if config.ema_every > 0 else None
        if lookahead is not None and use_cache and ckpt.exists() and state.get("lookahead") is not None:
            lookahead.load_state_dict(state["lookahead"])
        net = torch.compile(model) if compile else model
        step = start * steps
        can_save = True  # until a checkpoint write fails (a full disk)

        for epoch in range(start, config.last_epoch):
            t_epoch = time.perf_counter()
            model.train()
            loader.set_epoch(epoch)
            g = torch.Generator().manual_seed(config.seed * 7919 + epoch)  # attack random starts
            losses = torch.zeros(steps, device=device)
            correct = torch.zeros(steps, device=device)
            seen = 0
            bar = tqdm(loader, total=steps, desc=f"{config.arch} {config.recipe} epoch {epoch + 1}/{config.epochs}",
                       disable=not bars, leave=False, mininterval=1.0)
            for i, (x, y) in enumerate(bar):
                if prec["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss, logits = _loss(net, x, y, config, g, autocast)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if config.sam_rho > 0:
                        _sam_second_step(net, x, y, config, g, autocast)
                    opt.step()
                sched.step()
                step += 1
                if lookahead is not None and step % config.ema_every == 0 and \
                        step >= config.ema_start_epochs * steps:
                    lookahead.update(model, step / (config.epochs * steps), config.ema_every)
                losses[i] = loss.detach()
                correct[i] = (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if (i + 1) % check_every == 0 or i + 1 == steps:
                    _check_finite(losses[: i + 1], epoch, i, config)
                    if bars:
                        bar.set_postfix(loss=f"{losses[max(0, i - check_every + 1): i + 1].mean().item():.3f}",
                                        acc=f"{correct[: i + 1].sum().item() / seen:.3f}", refresh=False)
            if lookahead is not None and lookahead.started:
                lookahead.copy_to(model)  # the epoch ends on the averaged weights (airbench)
            metrics = {"epoch": epoch, "loss": losses.mean().item(), "train_acc": correct.sum().item() / seen,
                       "lr": sched.get_last_lr()[0], "train_s": time.perf_counter() - t_epoch}
            if eval_ds is not None:
                metrics["test_acc"] = evaluate(model, eval_ds, device)["accuracy"]
            history.append(metrics)
            done = epoch + 1 == config.last_epoch
            info = {"config": dataclasses.asdict(config), "data_digest": ds.digest, "history": history,
                    "precision": prec}
            if use_cache and can_save:
                try:
                    atomic_save({"model": plain_state(model), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                                 "done": done, "info": info,
                                 "scaler": None if scaler is None else scaler.state_dict(),
                                 "lookahead": None if lookahead is None else lookahead.state_dict()}, ckpt)
                except OSError as e:  # a full disk loses the resume point, never the model being trained
                    can_save = False
                    warnings.warn(f"checkpoint not saved ({e}); training goes on without checkpoints and "
                                  f"the model will be trained again next time", RuntimeWarning, stacklevel=2)
            if epoch + 1 in snapshots and can_save:  # the early-stopped checkpoint of this run
                early = dataclasses.replace(config, stop_epochs=epoch + 1)
                atomic_save({"model": plain_state(model), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "epoch": epoch, "history": history, "done": True,
                             "info": {**info, "config": dataclasses.asdict(early), "snapshot_of": config.key(ds.digest)}},
                            checkpoint_path(early, ds.digest))
            if epoch_lines:
                print(f"epoch {epoch + 1}/{config.epochs}: loss {metrics['loss']:.3f}, train acc {metrics['train_acc']:.3f}")
            if callback is not None:
                callback(epoch, metrics)
        model = model.to(memory_format=torch.contiguous_format).eval()
        model.train_info = {"config": dataclasses.asdict(config), "data_digest": ds.digest, "history": history,
                            "precision": prec}
        return model


def _check_finite(losses: torch.Tensor, epoch: int, step: int, config: TrainConfig) -> None:
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        s = int(bad[0])
        raise NonFiniteLossError(
            f"training loss became {losses[s].item()} at epoch {epoch + 1}, step {s + 1} "
            f"(arch {config.arch}, recipe {config.recipe}, lr {config.lr}); lower the learning rate "
            "(or add warmup_epochs) and check the inputs are in [0, 1]")


def _sam_second_step(model, x, y, config, generator, autocast):
    """SAM: move to w + ρ g/‖g‖, take the gradient there, move back (the optimizer steps with it)."""
    ps = [p for p in model.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([p.grad.norm() for p in ps])) + 1e-12
    es = []
    with torch.no_grad():
        for p in ps:
            e = p.grad * (config.sam_rho / norm)
            p.add_(e)
            es.append(e)
    for p in ps:
        p.grad = None
    loss, _ = _loss(model, x, y, config, generator, autocast)
    loss.backward()
    with torch.no_grad():
        for p, e in zip(ps, es):
            p.sub_(e)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, ds: fdata.Dataset, device=None, batch_size: int = 500) -> dict:
    """Clean metrics in float32 and eval mode: accuracy, mean confidence (max softmax),
    mean confidence on correct / wrong points (None when there are none), mean loss, n.

    Non-finite parameters or logits raise ``ValueError`` naming the parameters or the rows
    (dataset indices): a NaN logit must not be counted as a prediction of class 0.
    """
    device = resolve_device(device)
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"model parameters/buffers {bad[:5]} contain NaN or inf; every accuracy computed "
                         "from them would be meaningless: check the checkpoint or the training run")
    was_training = model.training
    model.eval()
    n = 0
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    nonfinite = []
    with torch.no_grad():
        for x, y in fdata.Loader(ds, batch_size, device):
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            nonfinite.append(~torch.isfinite(logits).all(dim=1))
            p = logits.softmax(1)
            c, pred = p.max(1)
            ok = pred == y
            stats += torch.stack([ok.sum().double(), c.sum().double(), (c * ok).sum().double(),
                                  F.cross_entropy(logits, y, reduction="sum").double()])
            n += len(y)
    model.train(was_training)
    rows = torch.cat(nonfinite).nonzero()[:, 0]
    if len(rows):  # the one host sync of the check
        raise ValueError(f"the model's logits are NaN or inf for {len(rows)} of {n} inputs (dataset rows "
                         f"{rows[:10].tolist()}); check those images (pixels in [0, 1]) and the weights")
    correct, conf, conf_c, loss = stats.tolist()
    wrong = n - correct
    return {"accuracy": correct / n, "mean_confidence": conf / n,
            "confidence_correct": conf_c / correct if correct else None,
            "confidence_wrong": (conf - conf_c) / wrong if wrong else None,
            "loss": loss / n, "n": n}


def robust_accuracy(model: nn.Module, ds: fdata.Dataset, device=None, eps: float = 8 / 255, steps: int = 10,
                    step_size: float = 2 / 255, batch_size: int = 250, seed: int = 0) -> float:
    """Accuracy under the private ℓ∞ PGD (CE, random start) — a sanity check for AT models;
    use :mod:`flatnb.attacks` for reported numbers."""
    device = resolve_device(device)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    correct, n = 0, 0
    for x, y in fdata.Loader(ds, batch_size, device):
        x_adv = _pgd_linf(model, x, y, eps, step_size, steps, True, g)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum().item()
        n += len(y)
    return correct / n


def trained_model(arch: str, dataset: str, recipe: str = "standard", profile: str = "quick", seed: int = 0,
                  device=None, root=None, progress: bool | None = None) -> nn.Module:
    """The model of ``config_for(arch, dataset, recipe, profile, seed)`` in eval mode on ``device``:
    loaded from the checkpoint cache, or trained once (resuming an interrupted run).

    ``arch="main"`` is the profile's main model (FastNet in the quick profile, the paper's
    ResNet-18 in the full one; :data:`flatnb.config.recipes.MAIN`); ``profile="auto"`` is resolved by
    :func:`flatnb.runtime.resolve_profile` for ``device`` (full on CUDA, quick elsewhere)."""
    device = resolve_device(device)
    config = config_for(arch, dataset, recipe, resolve_profile(profile, device), seed)
    return train(config, device, root=root, progress=progress)
