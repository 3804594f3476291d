"""The networks of the book, each following the flatnb model contract.

Every network here subclasses :class:`ContractModel`: ``features(x) -> (N, m)``
(the penultimate features φ), ``head`` = the final ``nn.Linear`` and
``forward(x) == head(features(x))``. Inputs are pixels in [0, 1]; each model
normalises inside itself (per-channel mean/std buffers), so attacks work in [0, 1].
Build them by name with :func:`flatnb.models.build`; give any other classifier the
contract with :func:`flatnb.models.wrap`.

ViT attention uses :func:`torch.nn.functional.scaled_dot_product_attention`. The
fused flash / memory-efficient kernels have no double backward (PyTorch issues
#116350, #117629), so on the CPU the ViT always asks for the math backend while
grad is enabled. On a GPU it uses the fast kernels; for curvature through
attention (Hessian-vector products, double backward) wrap the computation in
``with torch.nn.attention.sdpa_kernel(SDPBackend.MATH): ...`` or set
``model.math_attention = True``. Curvature in the last layer only needs
``features``, which needs no double backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """CIFAR ResNet-18: 3×3 stem, no max-pool, stages of width w, 2w, 4w, 8w; m = 8w (512 at w=64).

    ``stem_stride=2`` halves the resolution in the stem (Tiny ImageNet's 64 pixels: the stages then run at
    CIFAR's 32, 16, 8, 4, a quarter of the compute; the same parameters and features)."""

    def __init__(self, num_classes, width=64, mean=_CIFAR10[0], std=_CIFAR10[1], stem_stride=1):
        super().__init__()
        self.norm = Normalize(mean, std)
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
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


# ----------------------------------------------------------------------------- DenseNet-121

class DenseLayer(nn.Module):
    """DenseNet-BC's bottleneck layer: BN-ReLU-1×1 conv to 4k channels, BN-ReLU-3×3 conv to k; its k new
    channels are concatenated to its input (Huang et al. 2017)."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1×1 conv (compression: ``cout`` = half the channels), then 2×2 average pooling."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(ContractModel):
    """CIFAR DenseNet-BC (kuangliu's layout of Huang et al.'s DenseNet-121): a 3×3 stem of 2k channels, dense
    blocks of ``blocks`` bottleneck layers of growth k, transitions that halve channels and resolution, a final
    BN-ReLU and global average pooling; φ = the pooled channels. ``blocks=(6, 12, 24, 16)`` is DenseNet-121
    (1 + 2·58 + 3 + 1 = 121 layers with weights); the paper's k = 32 gives m = 1024 features, k = 12 gives 384.
    """

    def __init__(self, num_classes, growth=32, blocks=(6, 12, 24, 16), mean=_CIFAR10[0], std=_CIFAR10[1]):
        super().__init__()
        if growth < 1 or not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"DenseNet needs growth >= 1 and blocks of >= 1 layer each, got growth={growth}, "
                             f"blocks={blocks}")
        self.norm = Normalize(mean, std)
        c = 2 * growth
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        layers = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        self.body = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)

    def _features(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.body(self.stem(x)))), 1).flatten(1)


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


# ----------------------------------------------------------------------------- small pedagogical networks

class MLP(ContractModel):
    """A ReLU MLP on flat inputs: ``depth`` hidden layers of ``hidden`` units, then the head.

    No normalisation (the theory chapters feed it synthetic, already centred data).
    """

    def __init__(self, d_in: int, hidden: int, num_classes: int, depth: int = 2):
        super().__init__()
        self.norm = nn.Identity()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)

    def _features(self, x):
        return self.body(x)


class SmallReLUNet(ContractModel):
    """A plain chain conv-ReLU-conv-ReLU-pool-linear-ReLU up to the features (m = ``m``).

    A ``Sequential`` of Lipschitz layers, so :func:`flatnb.curvature.bounds.global_lipschitz`
    can certify it (chapters 2 and 3); no internal normalisation, inputs in [0, 1].
    """

    def __init__(self, m: int = 64, num_classes: int = 10, channels: int = 3, width: int = 16):
        super().__init__()
        self.norm = nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, m), nn.ReLU())
        self.head = nn.Linear(m, num_classes)

    def _features(self, x):
        return self.body(x)


# ----------------------------------------------------------------------------- FastNet (quick main model)

class _FastGroup(nn.Module):
    """conv → max-pool 2 → BatchNorm → GELU → conv → BatchNorm → GELU (airbench's ConvGroup)."""

    def __init__(self, cin, cout, bn_momentum):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        for conv in (self.conv1, self.conv2):  # identity init of the first channels: an implicit residual
            nn.init.dirac_(conv.weight.data[: conv.weight.shape[1]])
        for bn in (self.norm1, self.norm2):  # scale fixed at 1, only the shift trains (as in airbench)
            bn.weight.requires_grad_(False)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(ContractModel):
    """A small CNN that trains to ≳ 85 % CIFAR-10 accuracy in a few CPU minutes (the quick profile's main model).

    After airbench94 (Jordan 2024, "94 % on CIFAR-10 in 3.29 seconds on a single GPU"): a frozen
    2×2 whitening conv (its filters are the ±eigenvectors of the training patches' covariance,
    set by :meth:`init_whitening`), GELU, three conv groups of widths ``w, 4w, 4w`` each halving
    the resolution, a global max-pool; φ = the pooled ``4w`` channels times ``logit_scale``.

    airbench multiplies the logits by 1/9 after its linear layer; here that factor multiplies
    the features instead, so ``forward(x) == head(features(x))`` holds exactly and ``head`` is
    the final ``nn.Linear`` (the contract). With the head's bias at zero the logits are the same.
    """

    def __init__(self, num_classes, width=32, mean=_CIFAR10[0], std=_CIFAR10[1], whiten_kernel=2,
                 logit_scale=1 / 9, bn_momentum=0.4):
        super().__init__()
        self.norm = Normalize(mean, std)
        k = whiten_kernel
        self.whiten = nn.Conv2d(3, 2 * 3 * k * k, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.groups = nn.Sequential(_FastGroup(2 * 3 * k * k, width, bn_momentum),
                                    _FastGroup(width, 4 * width, bn_momentum),
                                    _FastGroup(4 * width, 4 * width, bn_momentum))
        self.logit_scale = float(logit_scale)
        self.head = nn.Linear(4 * width, num_classes)
        nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen whitening filters from ``images`` (N, 3, H, W) in [0, 1] (a few thousand suffice).

        Filters ±v_i/√(λ_i + eps) for the eigenpairs (λ_i, v_i) of the covariance (uncentred, as in
        airbench) of all k×k patches of the normalised images; computed in float64.
        """
        k = self.whiten.kernel_size[0]
        x = self.norm(images.to(self.whiten.weight.device, torch.float32)).double()
        c = x.shape[1]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = patches.T @ patches / len(patches)
        lam, vec = torch.linalg.eigh(cov)
        lam, vec = lam.flip(0), vec.flip(1)
        filt = (vec.T / torch.sqrt(lam.clamp_min(0) + eps)[:, None]).reshape(c * k * k, c, k, k)
        self.whiten.weight.copy_(torch.cat([filt, -filt]).to(self.whiten.weight.dtype))

    def _features(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        return F.adaptive_max_pool2d(x, 1).flatten(1) * self.logit_scale


def describe(cfg) -> str:
    """The architecture a training configuration builds, in words: ``WRN-16-1``, ``ViT (dim 192, depth 12)``,
    ``resnet18 (width 64)`` (the quick profile shrinks some; compare with the full profile's description)."""
    kw = dict(cfg.model_kw)
    if cfg.arch == "wrn28_4":
        return f"WRN-{kw.get('depth', 28)}-{kw.get('widen', 4)}"
    if cfg.arch == "densenet121":
        blocks = tuple(kw.get("blocks", (6, 12, 24, 16)))
        return f"DenseNet-{2 * sum(blocks) + len(blocks) + 1} (k={kw.get('growth', 32)})"
    if cfg.arch.startswith("vit"):
        return f"ViT (dim {kw.get('dim', 192)}, depth {kw.get('depth', 12)})"
    stem = ", stride-2 stem" if kw.get("stem_stride", 1) != 1 else ""
    return f"{cfg.arch} (width {cfg.width or 64}{stem})"
