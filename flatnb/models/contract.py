"""The model contract, and what the book does to any model that follows it.

Contract: ``model.features(x) -> (N, m)`` penultimate features φ, ``model.head`` the
final ``nn.Linear`` (``in_features = m``), and ``model(x) == model.head(model.features(x))``.

* :func:`build` — the book's networks by name (:mod:`flatnb.models.architectures`).
* :func:`wrap` — any classifier whose last layer is an ``nn.Linear`` (a torchvision or
  timm model, a RobustBench model, your own) as a :class:`HeadModel`, sharing its weights.
* :func:`scale_head` — the temperature-scaled copy ``f_s`` (weight *and* bias times ``s``).
* :func:`fold_batchnorm` — the same function with Conv→BatchNorm pairs folded (faster attacks).
* :func:`check_contract`, :func:`num_features`.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from flatnb.config.train_config import MODELS
from flatnb.models import architectures as arch


# ----------------------------------------------------------------------------- the contract

def check_contract(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` follows the flatnb model contract.

    Only the structure is checked here (no forward pass); :func:`wrap` with an
    ``example`` input also checks ``model(x) == head(features(x))`` numerically.
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
            + ". Give it the contract with flatnb.models.wrap(model, head='<name of its last Linear>')."
        )


def num_features(model: nn.Module) -> int:
    """m, the dimension of φ (the head's ``in_features``)."""
    check_contract(model)
    return model.head.in_features


class HeadModel(nn.Module):
    """A contract model made of two parts: ``features`` (any module or callable) and ``head``."""

    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.body = features
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.body(x)
        return phi.flatten(1) if phi.dim() > 2 else phi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- factory

def build(name: str, num_classes: int, image_size: int = 32, **kw) -> nn.Module:
    """Build one of the book's networks by name (``MODELS``); inputs are [0,1] images of ``image_size``.

    kw: ``width`` (resnet18, default 64; vgg11_bn, default 64; fastnet, default 32), ``depth``/``widen``
    (wrn28_4), ``growth``/``blocks`` (densenet121: default k = 32 and DenseNet-121's blocks (6, 12, 24, 16)),
    ``dim``/``depth``/``heads``/``patch`` (ViTs), ``mean``/``std`` for the internal normalisation (default:
    CIFAR-10 statistics).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "resnet18":
        return arch.ResNet18(num_classes, **kw)
    if name == "wrn28_4":
        return arch.WideResNet(num_classes, **{"depth": 28, "widen": 4, **kw})
    if name == "vgg11_bn":
        return arch.VGG11BN(num_classes, **kw)
    if name == "densenet121":
        return arch.DenseNet(num_classes, **kw)
    if name == "vit_tiny":
        return arch.ViT(num_classes, image_size, **{"dim": 192, "depth": 12, "heads": 3, **kw})
    if name == "vit_small":
        return arch.ViT(num_classes, image_size, **{"dim": 384, "depth": 12, "heads": 6, **kw})
    if name == "fastnet":
        return arch.FastNet(num_classes, **kw)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


# ----------------------------------------------------------------------------- wrap any classifier

def _last_linear_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise TypeError(f"{type(model).__name__} has no nn.Linear layer: flatnb needs a final linear "
                        "classifier (the head) to split the model into features and head")
    return names[-1]


def _without(model: nn.Module, path: str) -> nn.Module:
    """A structural copy of ``model`` whose submodule at ``path`` is ``nn.Identity``.

    Only the modules along ``path`` are copied (shallowly); every parameter and buffer
    is shared with ``model``, which is left untouched.
    """
    parts = path.split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parent = root
    for p in parts[:-1]:
        if p not in parent._modules:
            raise ValueError(f"{type(model).__name__} has no submodule {path!r}")
        child = copy.copy(parent._modules[p])
        child._modules = dict(child._modules)
        parent._modules[p] = child
        parent = child
    if parts[-1] not in parent._modules:
        raise ValueError(f"{type(model).__name__} has no submodule {path!r}")
    parent._modules[parts[-1]] = nn.Identity()
    return root


def wrap(model: nn.Module, head: str | None = None, example: torch.Tensor | None = None) -> HeadModel:
    """Give ``model`` the flatnb contract: ``features`` = the model with its head replaced by the
    identity, ``head`` = its final ``nn.Linear``. Weights are shared, not copied.

    ``head`` names the last linear layer as a dotted path (``"fc"`` for torchvision ResNets,
    ``"classifier.6"`` for torchvision VGG, ``"head"`` for timm ViTs, ``"linear"`` or ``"fc"``
    for most RobustBench CIFAR models); by default the last ``nn.Linear`` registered in the
    model. That default is a guess about execution order, so pass ``example`` (a small batch
    of valid inputs) to check ``model(x) == head(features(x))``: a mismatch raises
    ``ValueError`` naming the layer and the fix. Models that already follow the contract are
    returned wrapped as they are.
    """
    if isinstance(model, HeadModel):
        return model
    if callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Linear) \
            and head is None:
        wrapped = HeadModel(_FeaturesOf(model), model.head)
    else:
        path = head or _last_linear_name(model)
        layer = model.get_submodule(path)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{path!r} is a {type(layer).__name__}, not an nn.Linear; name the model's "
                            "final linear layer with head=...")
        wrapped = HeadModel(_without(model, path), layer)
    wrapped.train(model.training)
    if example is not None:
        with torch.no_grad():
            ref = model(example)
            try:
                out = wrapped(example)
            except RuntimeError:  # removing a layer that is not last breaks the shapes downstream
                out = None
        if out is None or ref.shape != out.shape or not torch.allclose(ref, out, rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"model(x) != head(features(x)) with head {head or _last_linear_name(model)!r}: that layer "
                "is not the last operation of the model's forward (or something follows it); pass "
                "head='<path of the final nn.Linear>'")
    return wrapped


class _FeaturesOf(nn.Module):
    """``model.features`` as a module's forward (for models that already follow the contract)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


# ----------------------------------------------------------------------------- temperature

def scale_head(model: nn.Module, s: float) -> nn.Module:
    """A deep copy of ``model`` with ``head.weight`` and ``head.bias`` multiplied by ``s``.

    Scaling both is softmax temperature ``1/s``: logits become ``s * z``, so the arg max
    (every decision) is unchanged while the confidence and the flatness measures change.
    The original model is not touched; the copy keeps its train/eval mode, device and dtype.
    """
    if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"the scale s must be a finite number > 0, got {s!r}")
    check_contract(model)
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.head.weight.mul_(s)
        if out.head.bias is not None:
            out.head.bias.mul_(s)
    return out


# ----------------------------------------------------------------------------- BatchNorm folding

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
        features = fuse(_FeaturesOf(model), inplace=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure gets the same advice
        raise ValueError(f"{type(model).__name__}.features cannot be traced by torch.fx ({type(e).__name__}: {e}); "
                         "attack the unfolded model instead") from e
    return HeadModel(features, copy.deepcopy(model.head)).eval()
