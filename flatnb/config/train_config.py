"""What determines a trained model: :class:`TrainConfig`, the training losses (:data:`RECIPES`) and the names
of the architectures and datasets a configuration may name (:data:`MODELS`, :data:`DATASETS`,
:data:`NUM_CLASSES`).

:mod:`flatnb.models` builds the architectures and :mod:`flatnb.data` loads the datasets named here; the
table of configurations is :data:`flatnb.config.recipes.TABLE`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

#: the architectures :func:`flatnb.models.build` knows
MODELS = ("resnet18", "wrn28_4", "vgg11_bn", "densenet121", "vit_tiny", "vit_small", "fastnet")
#: the datasets :func:`flatnb.data.load` reads, and their number of classes
DATASETS = ("cifar10", "cifar100", "tinyimagenet")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200}

RECIPES = ("standard", "pgd_at", "trades")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (all of it goes into the checkpoint key)."""

    arch: str = "resnet18"
    dataset: str = "cifar10"
    recipe: str = "standard"
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" (per step, after warmup), "constant" or "triangle" (optim.lr_lambda)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    sam_rho: float = 0.0  # > 0 enables SAM (Foret et al. 2021)
    augment: bool = True  # random crop (pad 4) + horizontal flip
    n_train: int | None = None  # seeded random subset of the training set (None = all)
    num_classes: int | None = None  # keep only the first k classes (Tiny ImageNet quick profile)
    width: int | None = None  # ResNet-18 / VGG width multiplier (None = model default)
    model_kw: tuple = ()  # extra build() kwargs as sorted (key, value) pairs
    eps: float = 8 / 255  # adversarial training: ℓ∞ radius
    pgd_steps: int = 10
    pgd_step_size: float = 2 / 255
    pgd_random_start: bool = True
    at_alpha: float = 0.0  # pgd_at: weight of the clean loss
    trades_beta: float = 6.0
    seed: int = 0
    profile: str = "custom"
    # Added later; left out of the checkpoint key while at their defaults (old checkpoints stay valid).
    bias_lr_scale: float = 1.0  # lr multiplier of the BatchNorm parameters (their decay per step stays the same)
    ema_every: int = 0  # > 0: lookahead EMA of the weights every n steps, copied back into the model (airbench)
    ema_start_epochs: float = 0.0  # when the lookahead EMA starts
    mixup_alpha: float = 0.0  # > 0: mixup (Zhang et al. 2018) with Beta(α, α) weights
    cpu_bf16: bool = False  # bf16 autocast + channels_last on the CPU (training only)
    crop_pad: int = 4  # augmentation: random crop of this padding (with augment=True)
    crop_mode: str = "zeros"  # "zeros" (the paper's crop) or "reflect" (airbench's translation)
    # > 0: logit normalisation (Wei et al. 2022, LogitNorm): the training loss sees z / (τ‖z‖) with τ = logit_norm
    # (standard recipe only); the model's own logits are not normalised at test time
    logit_norm: float = 0.0
    # > 0: stop after this many epochs of the ``epochs``-epoch schedule (learning rate, warmup and lookahead all
    # follow the full schedule): an early-stopped checkpoint of the same run, bit-identical to the longer run's
    # weights after that epoch on the CPU (train(..., snapshots=...) writes it while training the longer run)
    stop_epochs: int = 0

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.arch not in MODELS:
            raise ValueError(f"arch must be one of {MODELS}, got {self.arch!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.schedule not in ("cosine", "constant", "triangle"):
            raise ValueError(f"schedule must be 'cosine', 'constant' or 'triangle', got {self.schedule!r}")
        if self.crop_mode not in ("zeros", "reflect") or not 0 <= self.crop_pad:
            raise ValueError(f"crop_mode must be 'zeros' or 'reflect' and crop_pad >= 0, got {self.crop_mode!r}, "
                             f"{self.crop_pad}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if not 0 <= self.stop_epochs <= self.epochs:
            raise ValueError(f"stop_epochs must be in [0, epochs] (0: the whole schedule), got {self.stop_epochs} "
                             f"with epochs={self.epochs}")
        if self.logit_norm < 0 or (self.logit_norm > 0 and self.recipe != "standard"):
            raise ValueError(f"logit_norm must be >= 0 and is for the standard recipe only, got {self.logit_norm} "
                             f"with recipe {self.recipe!r}")

    def key(self, data_digest: str = "") -> str:
        """Hash of the whole configuration plus the training data's identity."""
        d = dataclasses.asdict(self)
        for f in _LATER_FIELDS:
            if d[f.name] == f.default:
                del d[f.name]
        blob = json.dumps(d, sort_keys=True, default=str) + "|" + data_digest
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def last_epoch(self) -> int:
        """How many epochs this configuration trains: ``stop_epochs`` when set, else ``epochs``."""
        return self.stop_epochs or self.epochs

    @property
    def n_classes(self) -> int:
        return self.num_classes or NUM_CLASSES[self.dataset]

    @property
    def image_size(self) -> int:
        return 64 if self.dataset == "tinyimagenet" else 32


_LATER_FIELDS = tuple(f for f in dataclasses.fields(TrainConfig)
                      if f.name in ("bias_lr_scale", "ema_every", "ema_start_epochs", "mixup_alpha", "cpu_bf16",
                                                   "crop_pad", "crop_mode", "logit_norm", "stop_epochs"))
