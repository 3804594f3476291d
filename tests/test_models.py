"""flatnb.models: the contract for every model, normalisation, ViT double backward on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from flatnb import models

# small sizes keep the tests fast; the default sizes are checked structurally below
from flatnb.models import architectures
SMALL = [
    ("resnet18", 32, dict(width=4)),
    ("resnet18", 64, dict(width=4)),
    ("wrn28_4", 32, dict(depth=10, widen=1)),
    ("vgg11_bn", 32, dict(width=8)),
    ("vgg11_bn", 64, dict(width=8)),
    ("densenet121", 32, dict(growth=4, blocks=(1, 2, 1))),
    ("densenet121", 64, dict(growth=4, blocks=(1, 1))),
    ("vit_tiny", 32, dict(dim=32, depth=2, heads=2)),
    ("vit_small", 64, dict(dim=32, depth=1, heads=4)),
    ("fastnet", 32, dict(width=8)),
    ("fastnet", 64, dict(width=8)),
]


@pytest.mark.parametrize("name,size,kw", SMALL)
def test_contract(name, size, kw):
    torch.manual_seed(0)
    model = models.build(name, 7, image_size=size, **kw)
    models.check_contract(model)
    x = torch.rand(3, 3, size, size)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            out = model(x)
            phi = model.features(x)
            assert phi.shape == (3, model.head.in_features)
            assert out.shape == (3, 7)
            assert torch.allclose(out, model.head(phi), atol=1e-5)
    # normalisation is inside: a constant shift of the input changes the output
    with torch.no_grad():
        assert not torch.allclose(model(x), model((x + 0.3).clamp(0, 1)))


@pytest.mark.parametrize("name,m", [("resnet18", 512), ("wrn28_4", 256), ("vgg11_bn", 256), ("densenet121", 1024),
                                    ("vit_tiny", 192), ("vit_small", 384), ("fastnet", 128)])
def test_default_feature_dimension(name, m):
    """Feature dimensions of the paper's models (PAPER §5: ResNet-18 512, WRN-28-4 256, DenseNet-121 1024,
    VGG-BN 256)."""
    with torch.device("meta"):  # structure only: no time spent initialising weights
        model = models.build(name, 10)
    assert models.num_features(model) == m
    assert model.head.out_features == 10


def test_densenet121_has_121_layers_with_weights_at_any_growth_rate():
    """The name counts the convolutions and the linear layer (Huang et al. 2017: 1 stem + 2 per bottleneck layer
    of blocks 6, 12, 24, 16 + 3 transitions + 1 classifier); the growth rate k only sets the widths: 2k stem
    channels, k new channels per layer, halved at each transition (k = 12: 384 features)."""
    for k, m in ((32, 1024), (12, 384)):
        with torch.device("meta"):
            model = models.build("densenet121", 10, growth=k)
        layers = [mod for mod in model.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        assert len(layers) == 121 and models.num_features(model) == m
        assert model.stem.out_channels == 2 * k and all(
            mod.conv2.out_channels == k for mod in model.modules() if isinstance(mod, architectures.DenseLayer))
    with pytest.raises(ValueError, match="growth >= 1"):
        models.build("densenet121", 10, growth=0)


def test_resnet_width_multiplier():
    with torch.device("meta"):
        assert models.num_features(models.build("resnet18", 10, width=16)) == 128


def test_normalize_matches_formula():
    norm = architectures.Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 4)
    ref = torch.stack([(x[:, 0] - 0.1) / 0.5, (x[:, 1] - 0.2) / 0.25, (x[:, 2] - 0.3) / 2.0], 1)
    assert torch.allclose(norm(x), ref)


def test_check_contract_rejects():
    with pytest.raises(TypeError, match="contract"):
        models.check_contract(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))

    class NoLinearHead(nn.Module):
        def features(self, x):
            return x

        head = nn.Identity()

    with pytest.raises(TypeError, match="head"):
        models.check_contract(NoLinearHead())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet50", 10)
    with pytest.raises(ValueError):
        models.build("vit_tiny", 10, image_size=30)


def test_vit_double_backward_cpu_matches_finite_differences():
    """Curvature through attention on the CPU: Hessian-vector product w.r.t. the input
    by double backward equals a central difference of gradients (float64)."""
    torch.manual_seed(0)
    model = models.build("vit_tiny", 5, image_size=8, dim=16, depth=1, heads=2).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    y = torch.tensor([1, 3])

    def grad(z, create_graph=False):
        z = z.detach().requires_grad_(True) if not create_graph else z
        loss = nn.functional.cross_entropy(model(z), y)
        return torch.autograd.grad(loss, z, create_graph=create_graph)[0]

    z = x.clone().requires_grad_(True)
    g = grad(z, create_graph=True)
    hv = torch.autograd.grad((g * v).sum(), z)[0]
    h = 1e-5
    fd = (grad(x + h * v) - grad(x - h * v)) / (2 * h)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-8)
    assert hv.abs().max() > 0


def test_vit_math_attention_flag_gives_same_output():
    torch.manual_seed(0)
    model = models.build("vit_tiny", 5, dim=16, depth=1, heads=2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        model.math_attention = True
        b = model(x)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("resnet18", dict(width=8)), ("vgg11_bn", dict(width=8)),
                                     ("wrn28_4", dict(depth=10, widen=1)), ("fastnet", dict(width=8)),
                                     ("densenet121", dict(growth=4, blocks=(1, 2)))])
def test_fold_batchnorm_is_the_same_function_in_float64(name, kw):
    torch.manual_seed(0)
    model = models.build(name, 10, **kw).double()
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.eval()
    folded = models.fold_batchnorm(model)
    models.check_contract(folded)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref_phi, ref = model.features(x), model(x)
        phi, out = folded.features(x), folded(x)
    assert torch.allclose(phi, ref_phi, rtol=1e-11, atol=1e-12)
    assert torch.allclose(out, ref, rtol=1e-11, atol=1e-12)
    n_bn = lambda m: sum(isinstance(mm, nn.BatchNorm2d) for mm in m.modules())  # noqa: E731
    assert n_bn(folded) < n_bn(model)  # something was folded (WRN keeps its pre-activation BNs)
    # the input gradient (what attacks use) agrees too
    xg = x.clone().requires_grad_(True)
    g_ref = torch.autograd.grad(model(xg).sum(), xg)[0]
    g = torch.autograd.grad(folded(xg).sum(), xg)[0]
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_fold_batchnorm_refuses_training_mode_and_passes_vits_through():
    model = models.build("resnet18", 10, width=8)
    with pytest.raises(ValueError, match="eval"):
        models.fold_batchnorm(model.train())
    vit = models.build("vit_tiny", 10, depth=1).eval()
    assert models.fold_batchnorm(vit) is vit


# ----------------------------------------------------------------------------- wrap


def _same(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("builder,head", [("resnet18", "fc"), ("vgg11_bn", "classifier.6"), ("resnet18", None)])
def test_wrap_torchvision_models_share_weights_and_keep_the_function(builder, head):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, builder)(weights=None, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    wrapped = models.wrap(net, head=head, example=x)
    models.check_contract(wrapped)
    with torch.no_grad():
        ref = net(x)
        phi = wrapped.features(x)
        assert phi.shape == (2, wrapped.head.in_features)
        assert _same(wrapped(x), ref) and _same(wrapped.head(phi), ref)
    # weights are shared, not copied: a change to the original shows in the wrapper
    with torch.no_grad():
        wrapped.head.weight.mul_(2.0)
        assert _same(wrapped(x), net(x))
    assert isinstance(net.get_submodule(head or ("fc" if builder == "resnet18" else "classifier.6")), nn.Linear)


def test_wrap_rejects_a_layer_that_is_not_last_and_non_linear_heads():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(4, 3)  # registered first, runs last
            self.hidden = nn.Linear(6, 4)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    net = TwoHeads()
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match="head="):
        models.wrap(net, example=x)  # the default guess (last registered Linear) is 'hidden'
    wrapped = models.wrap(net, head="out", example=x)
    assert _same(wrapped(x), net(x))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        models.wrap(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), head="1")
    with pytest.raises(TypeError, match="no nn.Linear"):
        models.wrap(nn.Sequential(nn.ReLU()))


def test_scale_head_is_temperature():
    torch.manual_seed(0)
    model = models.build("resnet18", 10, width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    scaled = models.scale_head(model, 7.0)
    with torch.no_grad():
        assert _same(scaled(x), 7.0 * model(x))
    assert scaled.head.weight.data_ptr() != model.head.weight.data_ptr()
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            models.scale_head(model, bad)


# ----------------------------------------------------------------------------- FastNet


def test_fastnet_logit_scale_is_inside_the_features():
    """airbench's 1/9 logit factor multiplies φ, so forward == head(features) with head the final Linear."""
    torch.manual_seed(0)
    model = models.build("fastnet", 10, width=8).eval()
    with torch.no_grad():
        model.head.bias.uniform_(-1, 1)
        x = torch.rand(4, 3, 32, 32)
        raw = torch.nn.functional.adaptive_max_pool2d(model.groups(torch.nn.functional.gelu(
            model.whiten(model.norm(x)))), 1).flatten(1)
        assert torch.allclose(model.features(x), raw / 9, atol=1e-6)
        assert torch.allclose(model(x), raw @ model.head.weight.T / 9 + model.head.bias, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "whiten.weight" not in trainable and "groups.0.norm1.weight" not in trainable
    assert {"whiten.bias", "groups.0.norm1.bias", "head.weight", "head.bias"} <= trainable


def test_fastnet_whitening_decorrelates_patches_in_float64():
    """After init_whitening the positive filters map the images' 2×2 patches to (uncentred) covariance
    diag(λ/(λ + eps)), checked against an independent eigendecomposition (numpy) of the patch covariance."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 3, 8, 8, generator=g, dtype=torch.float64)
    images = (0.6 * base + 0.4 * base.roll(1, dims=1)).clamp(0, 1)  # correlated channels
    model = models.build("fastnet", 10, width=8).double()
    eps = 5e-4
    model.init_whitening(images, eps=eps)
    x = model.norm(images).numpy()
    patches = np.stack([x[:, :, i:i + 2, j:j + 2].reshape(len(x), -1)
                        for i in range(7) for j in range(7)], 1).reshape(-1, 12)
    lam = np.linalg.eigvalsh(patches.T @ patches / len(patches))[::-1]
    with torch.no_grad():
        out = torch.nn.functional.conv2d(model.norm(images), model.whiten.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    cov = (out.T @ out / len(out)).numpy()
    assert np.allclose(cov, np.diag(lam / (lam + eps)), atol=1e-8)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_describe_names_the_architecture_a_configuration_trains():
    from flatnb.training import train as ftrain

    from flatnb.config import recipes

    assert models.describe(recipes.GPU[("wrn28_4", "cifar10", "standard")]) == "WRN-28-4"  # the paper's
    assert models.describe(ftrain.config_for("wrn28_4", "cifar10", "standard", "full")) == "WRN-16-4"  # the CPU's
    assert models.describe(ftrain.config_for("resnet18", "tinyimagenet", "standard", "full")) == \
        "resnet18 (width 32, stride-2 stem)"
    vit = models.describe(ftrain.config_for("vit_tiny", "cifar10", "standard", "full"))
    assert vit.startswith("ViT (dim ") and "depth" in vit
    assert models.describe(ftrain.config_for("vgg11_bn", "cifar10", "standard", "full")).startswith("vgg11_bn (width ")
    assert models.describe(recipes.GPU[("densenet121", "cifar10", "standard")]) == "DenseNet-121 (k=32)"  # the paper's
    assert models.describe(ftrain.config_for("densenet121", "cifar10", "standard", "full")) == "DenseNet-121 (k=12)"
    assert models.describe(ftrain.config_for("densenet121", "cifar10", "standard", "quick")) == "DenseNet-21 (k=8)"


def test_resnet18_stride_2_stem_runs_the_stages_at_half_the_resolution():
    """Tiny ImageNet's CPU recipe: the same parameters and features, a quarter of the pixels after the stem."""
    torch.manual_seed(0)
    plain, strided = models.build("resnet18", 5, width=4), models.build("resnet18", 5, width=4, stem_stride=2)
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == \
        [(k, v.shape) for k, v in strided.state_dict().items()]
    x = torch.rand(2, 3, 64, 64)
    assert strided.stem(x).shape == (2, 4, 32, 32) and plain.stem(x).shape == (2, 4, 64, 64)
    assert strided(x).shape == (2, 5) and strided.features(x).shape == (2, 32)
