"""Networks that share one contract: ``features(x) -> (N, m)``, ``head`` = final ``nn.Linear``,
``forward(x) == head(features(x))``. Inputs are pixels in [0, 1]; every model
normalises inside itself (per-channel mean/std buffers), so attacks work in [0, 1].

ViT attention uses :func:`torch.nn.functional.scaled_dot_product_attention`. The
fused flash / memory-efficient kernels have no double backward (PAPER §6.9), so
on the CPU the ViT always asks for the math backend while grad is enabled. On a
GPU it uses the fast kernels; for curvature through attention (Hessian-vector
products, double backward) wrap the computation in
``with torch.nn.attention.sdpa_kernel(SDPBackend.MATH): ...`` or set
``model.math_attention = True``. Curvature in the last layer only needs
``features``, which needs no double backward.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("resnet18", "wrn28_4", "vgg11_bn", "vit_tiny", "vit_small")
_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers (saved in checkpoints)."""

    def __init__(self, mean=_CIFAR10[0], std=_CIFAR10[1]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class ContractModel(nn.Module):
    """Base class: subclasses define ``self.norm``, ``self.head`` and ``_features``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features φ(x), shape (N, m)."""
        return self._features(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(ContractModel):
    """CIFAR ResNet-18: 3×3 stem, no max-pool, stages of width w, 2w, 4w, 8w; m = 8w (512 at w=64)."""

    def __init__(self, num_classes, width=64, mean=_CIFAR10[0], std=_CIFAR10[1]):
        super().__init__()
        self.norm = Normalize(mean, std)
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(8 * w, num_classes)

    def _features(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


# ----------------------------------------------------------------------------- WideResNet-28-4

class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(ContractModel):
    """WRN-depth-widen; WRN-28-4 has m = 64·4 = 256 features."""

    def __init__(self, num_classes, depth=28, widen=4, mean=_CIFAR10[0], std=_CIFAR10[1]):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.norm = Normalize(mean, std)
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for g, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, (1 if g == 0 else 2) if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def _features(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.blocks(self.stem(x)))), 1).flatten(1)


# ----------------------------------------------------------------------------- VGG-11-BN

class VGG11BN(ContractModel):
    """VGG-11 with BatchNorm and three Linear layers 512→256→256→k (HYDRA style); m = 256."""

    cfg = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes, width=64, mean=_CIFAR10[0], std=_CIFAR10[1]):
        super().__init__()
        self.norm = Normalize(mean, std)
        layers, cin = [], 3
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = v * width // 64
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.body = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(inplace=True), nn.Linear(256, 256), nn.ReLU(inplace=True))
        self.head = nn.Linear(256, num_classes)

    def _features(self, x):
        return self.mlp(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


# ----------------------------------------------------------------------------- ViT

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, math_backend: bool):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if math_backend:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, math_backend):
        x = x + self.attn(self.ln1(x), math_backend)
        return x + self.mlp(self.ln2(x))


class ViT(ContractModel):
    """Pre-norm ViT with a class token; patch 4; φ = final LayerNorm of the class token (m = dim).

    ``math_attention``: ``None`` (default) uses the math SDPA backend on the CPU
    while grad is enabled (the CPU flash kernel has no double backward) and the
    fast kernels elsewhere; ``True`` always forces the math backend (set it on a
    GPU before computing curvature through attention).
    """

    def __init__(self, num_classes, image_size=32, patch=4, dim=192, depth=12, heads=3, mlp_ratio=4,
                 mean=_CIFAR10[0], std=_CIFAR10[1]):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        self.norm = Normalize(mean, std)
        self.math_attention: bool | None = None
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_vit_init)

    def _features(self, x):
        math_backend = bool(self.math_attention) or (
            self.math_attention is None and x.device.type == "cpu" and torch.is_grad_enabled())
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for blk in self.blocks:
            t = blk(t, math_backend)
        return self.ln(t[:, 0])


def _vit_init(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- factory

def build(name: str, num_classes: int, image_size: int = 32, **kw) -> nn.Module:
    """Build a model by name (``MODELS``); inputs are [0,1] images of ``image_size``.

    kw: ``width`` (resnet18, default 64; vgg11_bn, default 64), ``depth``/``widen``
    (wrn28_4), ``dim``/``depth``/``heads`` (ViTs), ``mean``/``std`` for the
    internal normalisation (default: CIFAR-10 statistics).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "resnet18":
        model = ResNet18(num_classes, **kw)
    elif name == "wrn28_4":
        model = WideResNet(num_classes, **{"depth": 28, "widen": 4, **kw})
    elif name == "vgg11_bn":
        model = VGG11BN(num_classes, **kw)
    elif name == "vit_tiny":
        model = ViT(num_classes, image_size, **{"dim": 192, "depth": 12, "heads": 3, **kw})
    elif name == "vit_small":
        model = ViT(num_classes, image_size, **{"dim": 384, "depth": 12, "heads": 6, **kw})
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return model


def check_contract(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` follows the flatnb model contract.

    Contract: ``model.features(x) -> (N, m)`` penultimate features, ``model.head``
    is the final ``nn.Linear`` (in_features = m), and ``model(x) == model.head(model.features(x))``.
    Only the structure is checked here (no forward pass).
    """
    problems = []
    if not callable(getattr(model, "features", None)):
        problems.append("no callable model.features(x) returning (N, m) penultimate features")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        problems.append(f"model.head must be the final nn.Linear, got {type(head).__name__}")
    if problems:
        raise TypeError(
            f"{type(model).__name__} does not follow the flatnb model contract "
            "(features(x) -> (N, m), head = final nn.Linear, forward(x) == head(features(x))): "
            + "; ".join(problems)
        )


def num_features(model: nn.Module) -> int:
    """m, the dimension of φ (the head's ``in_features``)."""
    check_contract(model)
    return model.head.in_features


class _Features(nn.Module):
    """``features`` as a module's ``forward``, so torch.fx can trace it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


class FoldedModel(nn.Module):
    """A contract model whose ``features`` is a traced graph with Conv→BatchNorm pairs folded."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.folded_features = features
        self.head = head

    def features(self, x):
        return self.folded_features(x)

    def forward(self, x):
        return self.head(self.folded_features(x))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv→BatchNorm pair folded into one conv.

    The same function up to float rounding (eval-mode BatchNorm is affine), with one
    pass over each activation less, forward and backward: attacks and curvature
    along attack paths run faster (``benchmarks/attacks.py``).  The original model is
    untouched.  Models without BatchNorm (the ViTs) are returned as they are.
    Pre-activation blocks (BatchNorm before the conv, as in WRN) keep those BatchNorms.
    """
    check_contract(model)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if model.training:
        raise ValueError("fold_batchnorm folds eval-mode running statistics; call model.eval() first "
                         "(folding a training-mode BatchNorm would change the function)")
    from torch.fx.experimental.optimization import fuse

    try:
        features = fuse(_Features(model), inplace=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure gets the same advice
        raise ValueError(f"{type(model).__name__}.features cannot be traced by torch.fx ({type(e).__name__}: {e}); "
                         "attack the unfolded model instead") from e
    return FoldedModel(features, copy.deepcopy(model.head)).eval()
