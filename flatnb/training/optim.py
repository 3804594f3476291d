"""How :func:`flatnb.training.train.train` runs a configuration: precision, optimizer, weight averaging.

* :func:`select_precision` — bf16 / fp16 + gradient scaler / float32, memory format, fused SGD.
* :func:`optimizer` — SGD (AdamW for ViTs) with parameter groups (no decay on 1-d parameters;
  BatchNorm at a scaled learning rate, as in airbench, Jordan 2024).
* :func:`lr_lambda` — the learning-rate schedules.
* :class:`Lookahead` — airbench's lookahead EMA of the weights.

``config`` is a :class:`flatnb.config.train_config.TrainConfig` (not imported here: train imports this module).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def select_precision(device: torch.device | str, config, compile: bool = False) -> dict:
    """How :func:`train` runs ``config`` on ``device`` (stored in ``model.train_info["precision"]``).

    CUDA: channels_last, fused SGD, bf16 autocast where ``torch.cuda.is_bf16_supported()``,
    else fp16 autocast with a gradient scaler (T4, V100); SAM keeps float32 there (its two
    backward passes per step do not fit one scaler step). CPU: float32, or bf16 autocast with
    channels_last when ``config.cpu_bf16``. Weights, BatchNorm statistics and the loss stay
    float32 (autocast casts per operation).
    """
    dev = torch.device(device)
    out = {"device": dev.type, "autocast": None, "grad_scaler": False, "channels_last": False,
           "fused_sgd": False, "compile": bool(compile)}
    if dev.type == "cuda":
        out["channels_last"] = True
        out["fused_sgd"] = not config.arch.startswith("vit")
        if torch.cuda.is_bf16_supported():
            out["autocast"] = "bf16"
        elif config.sam_rho == 0:
            out["autocast"], out["grad_scaler"] = "fp16", True
    elif config.cpu_bf16:
        out["autocast"], out["channels_last"] = "bf16", True
    return out


def optimizer(model: nn.Module, config, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (AdamW for ViTs, which plain SGD does not train in a few epochs) without weight decay on
    one-dimensional parameters. With ``bias_lr_scale != 1`` the BatchNorm parameters form a third
    group with ``lr · scale`` and ``weight_decay / scale`` (the same decay per step; airbench)."""
    bn = set()
    if config.bias_lr_scale != 1:
        bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1 and id(p) not in bn]  # no weight decay on BN/LayerNorm/bias
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if bn:
        groups.append({"params": [p for p in params if id(p) in bn], "lr": config.lr * config.bias_lr_scale,
                       "weight_decay": config.weight_decay / config.bias_lr_scale})
    if config.arch.startswith("vit"):
        return torch.optim.AdamW(groups, lr=config.lr)
    kw = {"fused": True} if fused else {}
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, **kw)


def plain_state(model: nn.Module) -> dict:
    """The state dict in the default memory format (checkpoints do not depend on how training ran)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


class Lookahead:
    """Lookahead EMA of all float weights and buffers (airbench): every few steps
    ``ema ← ema + (1 - ρ)(w - ema)`` and then ``w ← ema``, with ``ρ = 0.95^n · (progress)^3``."""

    def __init__(self, model: nn.Module):
        self.ema: dict | None = None

    @property
    def started(self) -> bool:
        return self.ema is not None

    @torch.no_grad()
    def update(self, model: nn.Module, progress: float, every: int) -> None:
        sd = model.state_dict()
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in sd.items() if v.is_floating_point()}
            return
        rho = 0.95 ** every * progress ** 3
        for k, e in self.ema.items():
            e.lerp_(sd[k], 1 - rho)
            sd[k].copy_(e)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        sd = model.state_dict()
        for k, e in self.ema.items():
            sd[k].copy_(e)

    def state_dict(self) -> dict | None:
        return None if self.ema is None else {k: v.contiguous() for k, v in self.ema.items()}

    def load_state_dict(self, state: dict | None) -> None:
        self.ema = None if state is None else dict(state)


# the triangular schedule (airbench): lr factor TRIANGLE[0] at step 0, 1 after warmup_epochs, TRIANGLE[1] at the end
TRIANGLE = (0.2, 0.07)


def lr_lambda(config, steps_per_epoch: int):
    """The learning-rate factor per step: linear warmup over ``warmup_epochs``, then cosine to 0 or
    constant; or airbench's triangle (TRIANGLE[0] → 1 at ``warmup_epochs`` → TRIANGLE[1] at the end)."""
    total = config.epochs * steps_per_epoch
    warm = int(config.warmup_epochs * steps_per_epoch)

    if config.schedule == "triangle":
        lo, end = TRIANGLE

        def tri(step):
            if step < warm:
                return lo + (1 - lo) * step / warm
            return 1 + (end - 1) * min(1.0, (step - warm) / max(1, total - warm))

        return tri

    def f(step):
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f
