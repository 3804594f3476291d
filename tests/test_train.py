"""flatnb.training.train: configs, resume after interruption, recipes, NaN detection, evaluation."""
from __future__ import annotations

import dataclasses
import os
import time
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatnb import data, models
from flatnb.training import train as T


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNB_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> Path:
    """A synthetic CIFAR-10 pickle folder: 10 classes separable by mean colour, 6 per class (not the real
    CIFAR-10, so the SHA-256 gate of flatnb.data is lifted for it)."""
    from flatnb.data import datasets

    monkeypatch.setattr(datasets, "CIFAR10_SHA256", {})
    rng = np.random.default_rng(0)
    base = tmp_path / "data" / "cifar-10-batches-py"
    base.mkdir(parents=True)

    def split(n):
        lab = np.arange(n) % 10
        img = rng.integers(0, 60, (n, 3, 32, 32)) + (lab * 19)[:, None, None, None]
        return img.astype(np.uint8).reshape(n, -1), lab.tolist()

    for i in range(1, 6):
        arr, lab = split(12)
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": arr, "labels": lab}, f)
    arr, lab = split(20)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": arr, "labels": lab}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return tmp_path / "data"


def tiny_config(**kw) -> T.TrainConfig:
    base = dict(arch="resnet18", dataset="cifar10", epochs=2, batch_size=16, width=4, lr=0.05, warmup_epochs=1,
                weight_decay=5e-4)
    return T.TrainConfig(**{**base, **kw})


class Stop(Exception):
    pass


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_run_resumes_identically(cifar_root):
    cfg = tiny_config()
    ref = _state(T.train(cfg, "cpu", root=cifar_root, use_cache=False, progress=False))

    seen = []

    def stop_after_first(epoch, metrics):
        seen.append(epoch)
        if epoch == 0:
            raise Stop()

    with pytest.raises(Stop):
        T.train(cfg, "cpu", root=cifar_root, callback=stop_after_first, progress=False)
    ds = T.training_data(cfg, cifar_root)
    ckpt = T.checkpoint_path(cfg, ds.digest)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 0 and not saved["done"] and len(saved["history"]) == 1
    assert not list(ckpt.parent.glob("*.tmp"))

    model = T.train(cfg, "cpu", root=cifar_root, callback=lambda e, m: seen.append(e), progress=False)
    assert seen == [0, 1]  # resumed at epoch 1, did not redo epoch 0
    got = _state(model)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(got[k].float(), ref[k].float(), atol=1e-6), k
    assert not model.training
    final = torch.load(ckpt, weights_only=False)
    assert final["done"] and [h["epoch"] for h in final["history"]] == [0, 1]

    # a finished checkpoint is loaded, never retrained
    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    orig = T._loss
    T._loss = boom
    try:
        again = T.train(cfg, "cpu", root=cifar_root, progress=False)
    finally:
        T._loss = orig
    for k in ref:
        assert torch.equal(_state(again)[k], got[k])


def test_a_full_disk_loses_the_checkpoint_not_the_trained_model(cifar_root, monkeypatch):
    """ENOSPC on a checkpoint write: one warning naming the cause, training finishes on the same
    weights as an uncached run, and nothing half-written is left in the cache."""
    import errno

    from flatnb import runtime

    cfg = tiny_config()
    ref = _state(T.train(cfg, "cpu", root=cifar_root, use_cache=False, progress=False))
    data.load("cifar10", "train", root=cifar_root)  # the data cache is written before the disk fills
    calls = []

    def full(obj, f):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.torch, "save", full)
    with pytest.warns(RuntimeWarning, match="checkpoint not saved .*no space left on the device") as w:
        model = T.train(cfg, "cpu", root=cifar_root, progress=False)
    assert len([x for x in w if "checkpoint not saved" in str(x.message)]) == 1 and calls == [1]
    got = _state(model)
    for k in ref:
        assert torch.allclose(got[k].float(), ref[k].float(), atol=1e-6), k
    ckpt_dir = T.checkpoint_path(cfg, T.training_data(cfg, cifar_root).digest).parent
    assert [p.name for p in ckpt_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_config_key_covers_every_field():
    cfg = tiny_config()
    assert cfg.key("d") == tiny_config().key("d")
    assert cfg.key("d") != cfg.key("e")  # other data → other checkpoint
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool):
            new = not v
        elif isinstance(v, (int, float)) and f.name not in ("epochs", "batch_size"):
            new = v + 1
        else:
            continue
        assert dataclasses.replace(cfg, **{f.name: new}).key("d") != cfg.key("d"), f.name


def test_config_for_profiles():
    full = T.config_for("resnet18", "cifar10", profile="full", seed=3)
    assert (full.epochs, full.lr, full.momentum, full.weight_decay, full.batch_size, full.schedule) == \
        (100, 0.1, 0.9, 1e-4, 128, "cosine")
    assert full.width is None and full.n_train is None and full.label_smoothing == 0 and full.seed == 3
    at = T.config_for("resnet18", "cifar10", "pgd_at", profile="full")
    assert (at.eps, at.pgd_steps, at.pgd_step_size) == (8 / 255, 10, 2 / 255)
    assert T.config_for("resnet18", "cifar10", "trades", profile="full").trades_beta == 6.0
    quick = T.config_for("resnet18", "cifar10")
    assert quick.profile == "quick" and quick.width == 16 and quick.n_train == 50_000 and quick.epochs == 2
    assert T.config_for("resnet18", "tinyimagenet").num_classes == 20
    assert T.config_for("wrn28_4", "cifar100").width is None
    with pytest.raises(ValueError, match="recipe"):
        T.config_for("resnet18", "cifar10", recipe="cutmix")
    with pytest.raises(ValueError, match="profile"):
        T.config_for("resnet18", "cifar10", profile="auto")


def test_nonfinite_loss_names_epoch_and_step(cifar_root, monkeypatch):
    calls = {"n": 0}
    orig = T._loss

    def nan_on_third(*a, **k):
        loss, logits = orig(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), logits

    monkeypatch.setattr(T, "_loss", nan_on_third)
    with pytest.raises(T.NonFiniteLossError, match=r"epoch 1, step 3.*learning rate"):
        T.train(tiny_config(epochs=1), "cpu", root=cifar_root, progress=False, check_every=2)
    assert calls["n"] == 3  # stopped at the check right after the bad step


@pytest.mark.parametrize("recipe", ["pgd_at", "trades"])
def test_adversarial_recipes_run(cifar_root, recipe):
    cfg = tiny_config(recipe=recipe, epochs=1, n_train=32, pgd_steps=2, pgd_step_size=4 / 255)
    model = T.train(cfg, "cpu", root=cifar_root, use_cache=False, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sam_runs_and_differs(cifar_root):
    a = T.train(tiny_config(epochs=1, n_train=32), "cpu", root=cifar_root, use_cache=False, progress=False)
    b = T.train(tiny_config(epochs=1, n_train=32, sam_rho=0.05), "cpu", root=cifar_root, use_cache=False, progress=False)
    assert not torch.allclose(a.head.weight, b.head.weight)


def test_private_pgd_stays_in_ball_and_raises_loss():
    torch.manual_seed(0)
    model = models.build("resnet18", 10, width=4).eval()
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    eps = 8 / 255
    adv = T._pgd_linf(model, x, y, eps, 2 / 255, 5, True, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_evaluate_against_direct_computation():
    torch.manual_seed(0)
    model = models.build("resnet18", 4, width=4).eval()
    g = torch.Generator().manual_seed(1)
    ds = data.Dataset(torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 4, (23,), generator=g), list("abcd"), "x")
    r = T.evaluate(model, ds, "cpu", batch_size=7)
    with torch.no_grad():
        p = model(ds.images.float() / 255).softmax(1)
    ok = p.argmax(1) == ds.labels
    assert r["n"] == 23
    assert r["accuracy"] == pytest.approx(ok.float().mean().item())
    assert r["mean_confidence"] == pytest.approx(p.max(1).values.mean().item(), rel=1e-5)
    assert r["loss"] == pytest.approx(-p[torch.arange(23), ds.labels].log().mean().item(), rel=1e-4)
    assert not model.training


def _real_cifar10_test():
    try:
        return data.load("cifar10", "test")
    except FileNotFoundError as e:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"real CIFAR-10 not available (set FLATNB_DATA): {e}")


@pytest.mark.slow
def test_quick_profile_real_cifar10(caller_cache):
    """The quick profile on the real data: >60 % CIFAR-10 test accuracy (64.2 % measured; about
    5 minutes of training on 2 cores). Trained once and shared with the chapters through the cache.
    """
    test = _real_cifar10_test()
    start = time.time()
    model = T.trained_model("resnet18", "cifar10", profile="quick", device="cpu", progress=False)
    acc = T.evaluate(model, test, "cpu")["accuracy"]
    print(f"quick ResNet-18: test accuracy {acc:.4f}, {time.time() - start:.0f} s (training included unless cached)")
    assert acc > 0.60


def test_a_second_process_waits_for_the_first_and_loads_its_result(cifar_root):
    """While one run holds the training lock of a config, another waits instead of training twice."""
    import threading

    cfg = tiny_config()
    ckpt = T.checkpoint_path(cfg, T.training_data(cfg, cifar_root).digest)
    result = {}
    with T._training_lock(ckpt):
        worker = threading.Thread(target=lambda: result.update(model=T.train(cfg, "cpu", root=cifar_root,
                                                                             progress=False)))
        worker.start()
        worker.join(timeout=2.0)
        assert worker.is_alive(), "train() did not wait for the lock"
        assert not ckpt.exists()
    worker.join(timeout=120)
    assert not worker.is_alive() and torch.load(ckpt, weights_only=False)["done"]
    assert not result["model"].training


def test_full_profile_vit_uses_an_adamw_learning_rate():
    from flatnb.config import recipes

    vit = T.config_for("vit_tiny", "cifar10", profile="full")
    assert vit.lr == 1e-3 and vit.weight_decay == 0.05
    gpu = recipes.GPU[("vit_tiny", "cifar10", "standard")]
    assert gpu.lr == 1e-3 and gpu.weight_decay == 0.05 and gpu.epochs == 100
    # the CNNs keep the paper's SGD recipe on a GPU, and SGD (scaled to batch 512) on the CPU
    assert recipes.GPU[("wrn28_4", "cifar10", "standard")].lr == 0.1
    assert T.config_for("wrn28_4", "cifar10", profile="full").lr == 0.4


def test_other_architectures_have_cpu_recipes_and_keep_the_paper_recipe_for_a_gpu():
    """Issue 24: the full entries of the other architectures are the zoo's CPU recipes (bf16, large batches but one,
    a one-cycle schedule, no label smoothing, a few epochs); the paper's 100-epoch recipe stays in recipes.GPU."""
    from flatnb.config import recipes

    assert set(recipes.GPU) == {("wrn28_4", "cifar10", "standard"), ("vgg11_bn", "cifar10", "standard"),
                                ("densenet121", "cifar10", "standard"), ("vit_tiny", "cifar10", "standard"), ("resnet18", "tinyimagenet", "standard"),
                                ("vit_tiny", "tinyimagenet", "standard")}
    for key, gpu in recipes.GPU.items():
        cpu = T.config_for(*key, profile="full")
        assert (cpu.arch, cpu.dataset, cpu.recipe) == (gpu.arch, gpu.dataset, gpu.recipe) == key
        # large batches, except the Tiny ImageNet ViT's 128: its accuracy follows the epochs, and at one thread batch 128
        # runs no slower per image than 512 (recipes._VIT_TINY_CPU); changed in session 14, with that reason
        big = 128 if key == ("vit_tiny", "tinyimagenet", "standard") else 512
        assert cpu.cpu_bf16 and cpu.batch_size >= big and cpu.epochs <= gpu.epochs / 2 and cpu.crop_mode == "reflect"
        assert cpu.label_smoothing == cpu.mixup_alpha == cpu.sam_rho == 0
        assert cpu.schedule in ("triangle", "cosine") and 0 < cpu.warmup_epochs < cpu.epochs
        assert gpu.epochs == 100 and gpu.profile == "full" and not gpu.cpu_bf16
        assert gpu.batch_size == 128 and gpu.lr == (1e-3 if key[0].startswith("vit") else 0.1)
        assert cpu.key("x") != gpu.key("x")
    assert dict(T.config_for("wrn28_4", "cifar10", profile="full").model_kw) == {"depth": 16, "widen": 4}
    # DenseNet-121 keeps its 121 layers on the CPU at growth rate 12; the GPU recipe builds the paper's k = 32
    assert dict(T.config_for("densenet121", "cifar10", profile="full").model_kw) == {"growth": 12}
    assert recipes.GPU[("densenet121", "cifar10", "standard")].model_kw == ()
    # Tiny ImageNet's translation covers the same share of its 64 pixels as 2 pixels of CIFAR's 32
    assert T.config_for("resnet18", "tinyimagenet", profile="full").crop_pad == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing-key"])
def test_corrupt_checkpoint_is_moved_aside_and_retrained(cifar_root, damage):
    cfg = tiny_config(epochs=1)
    first = _state(T.train(cfg, "cpu", root=cifar_root, progress=False))
    ckpt = T.checkpoint_path(cfg, T.training_data(cfg, cifar_root).digest)
    blob = ckpt.read_bytes()
    if damage == "truncated":
        bad = blob[: len(blob) // 3]
    elif damage == "garbage":
        bad = b"\x80\x04 this is not a checkpoint" * 10
    else:
        state = torch.load(ckpt, weights_only=False)
        del state["model"]["fc.weight" if "fc.weight" in state["model"] else next(iter(state["model"]))]
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        bad = buf.getvalue()
    ckpt.write_bytes(bad)
    with pytest.warns(RuntimeWarning, match="corrupt or truncated") as w:
        model = T.train(cfg, "cpu", root=cifar_root, progress=False)
    aside = list(ckpt.parent.glob(ckpt.name + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept for inspection, never loaded
    msg = str(w[0].message)
    assert str(ckpt) in msg and str(aside[0]) in msg
    assert aside[0].name.rsplit("corrupt-", 1)[1].endswith("Z")  # UTC time stamp
    assert torch.load(ckpt, weights_only=False)["done"]  # retrained and saved again
    for k, v in _state(model).items():  # the same run as the first (same seed, CPU)
        assert torch.allclose(v.float(), first[k].float(), atol=1e-6), k


# ----------------------------------------------------------------------------- the recipe table, the fast paths

def test_recipe_table_covers_the_chapters_and_keeps_old_checkpoint_keys():
    from flatnb.config import recipes

    for arch, ds in [("resnet18", "cifar10"), ("resnet18", "cifar100"), ("resnet18", "tinyimagenet"),
                     ("wrn28_4", "cifar10"), ("vgg11_bn", "cifar10"), ("densenet121", "cifar10"),
                     ("vit_tiny", "cifar10"), ("vit_tiny", "tinyimagenet"), ("main", "cifar10")]:
        for prof in ("quick", "full"):
            cfg = T.config_for(arch, ds, "standard", prof, seed=2)
            assert cfg.profile == prof and cfg.seed == 2 and cfg.label_smoothing == 0
    for recipe in ("pgd_at", "trades"):
        for prof in ("quick", "full"):
            assert T.config_for("main", "cifar10", recipe, prof).recipe == recipe
    # the table reproduces the configurations of the former override chain bit for bit (same checkpoints)
    assert T.config_for("resnet18", "cifar10").key("x") == "056f96b829817e12"
    assert T.config_for("wrn28_4", "cifar10").key("x") == "1109f558cfcab5fb"
    # the former full entry (100 epochs) lives on as the GPU recipe, with its key (issue 24)
    assert recipes.GPU[("vit_tiny", "tinyimagenet", "standard")].key("x") == "a9770125151d8f5b"
    assert T.config_for("resnet18", "cifar10", "pgd_at").key("x") == "3a6a58d97d003d62"
    # roles
    assert recipes.resolve_arch("main", "quick") == "fastnet" and recipes.resolve_arch("main", "full") == "fastnet"
    assert T.config_for("main", "cifar10", profile="full") == T.config_for("fastnet", "cifar10", profile="full")
    assert T.config_for("main", "cifar10", profile="full").width == 64  # the shipped evidence model
    q = T.config_for("main", "cifar10")
    assert (q.arch, q.label_smoothing, q.mixup_alpha, q.sam_rho) == ("fastnet", 0.0, 0.0, 0.0)
    at = T.config_for("main", "cifar10", "pgd_at")
    assert (at.pgd_steps, at.pgd_step_size, at.pgd_random_start, at.eps) == (1, 10 / 255, True, 8 / 255)
    for variant, field in [("sam", "sam_rho"), ("label_smoothing", "label_smoothing"), ("mixup", "mixup_alpha")]:
        v = T.config_for("main", "cifar10", variant)
        assert getattr(v, field) > 0 and dataclasses.replace(v, **{field: 0.0}) == q
    with pytest.raises(ValueError, match="flatnb.config.recipes.TABLE"):
        T.config_for("vgg11_bn", "tinyimagenet")


def test_trained_model_resolves_main_and_auto(monkeypatch):
    seen = []
    monkeypatch.setattr(T, "train", lambda config, device, **kw: seen.append((config, device)) or "model")
    assert T.trained_model("main", "cifar10", profile="auto", device="cpu") == "model"
    assert seen[-1][0] == T.config_for("fastnet", "cifar10", profile="quick") and seen[-1][1].type == "cpu"
    T.trained_model("main", "cifar10", "pgd_at", profile="full", seed=1, device="cpu")
    assert seen[-1][0] == T.config_for("fastnet", "cifar10", "pgd_at", profile="full", seed=1)


def test_precision_selection(monkeypatch):
    fast, plain = T.config_for("main", "cifar10"), T.config_for("resnet18", "cifar10")
    assert T.select_precision("cpu", plain) == {"device": "cpu", "autocast": None, "grad_scaler": False,
                                                "channels_last": False, "fused_sgd": False, "compile": False}
    p = T.select_precision("cpu", fast, compile=True)
    assert (p["autocast"], p["channels_last"], p["grad_scaler"], p["compile"]) == ("bf16", True, False, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = T.select_precision("cuda", plain)
    assert (p["autocast"], p["grad_scaler"], p["channels_last"], p["fused_sgd"]) == ("bf16", False, True, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # T4, V100
    p = T.select_precision("cuda", plain)
    assert (p["autocast"], p["grad_scaler"]) == ("fp16", True)
    p = T.select_precision("cuda", dataclasses.replace(plain, sam_rho=0.05))  # SAM: two backwards, no scaler
    assert (p["autocast"], p["grad_scaler"]) == (None, False)
    assert not T.select_precision("cuda", T.config_for("vit_tiny", "cifar10"))["fused_sgd"]  # AdamW


def test_triangle_schedule_and_batchnorm_groups():
    from flatnb.training import optim

    cfg = tiny_config(arch="fastnet", width=4, schedule="triangle", epochs=2, warmup_epochs=0.5, bias_lr_scale=8.0)
    f = optim.lr_lambda(cfg, 10)  # 20 steps, peak at step 5
    assert f(0) == pytest.approx(0.2) and f(5) == pytest.approx(1.0) and f(20) == pytest.approx(0.07)
    assert f(12) == pytest.approx(1 + (0.07 - 1) * 7 / 15)
    model = T.build_model(cfg)
    opt = optim.optimizer(model, cfg)
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()
          if p.requires_grad}
    (group,) = [g for g in opt.param_groups if {id(p) for p in g["params"]} == bn]
    assert group["lr"] == pytest.approx(cfg.lr * 8) and group["weight_decay"] * group["lr"] == \
        pytest.approx(cfg.weight_decay * cfg.lr)
    assert len(optim.optimizer(model, dataclasses.replace(cfg, bias_lr_scale=1.0)).param_groups) == 2


def fast_tiny(**kw):
    return tiny_config(**{**dict(arch="fastnet", width=4, batch_size=16, lr=0.2, momentum=0.85, nesterov=True,
                                 bias_lr_scale=4.0, schedule="triangle", warmup_epochs=0.5, ema_every=2,
                                 ema_start_epochs=0.3, cpu_bf16=True), **kw})


def test_fastnet_recipe_trains_resumes_identically_and_records_precision(cifar_root):
    cfg = fast_tiny()
    ref = T.train(cfg, "cpu", root=cifar_root, use_cache=False, progress=False)
    assert ref.train_info["precision"]["autocast"] == "bf16"
    assert ref.whiten.weight.is_contiguous() and not ref.training  # default memory format for curvature
    assert ref.whiten.weight.abs().sum() > 0  # whitening was initialised from the data
    with pytest.raises(Stop):
        T.train(cfg, "cpu", root=cifar_root, progress=False, callback=lambda e, m: (_ for _ in ()).throw(Stop()))
    got = T.train(cfg, "cpu", root=cifar_root, progress=False)
    for k, v in _state(ref).items():
        assert torch.allclose(got.state_dict()[k].float(), v.float(), atol=1e-6), k
    assert all(torch.isfinite(p).all() for p in got.parameters())


def test_lookahead_and_mixup_change_the_result(cifar_root):
    base = fast_tiny(epochs=1, n_train=48)
    a = T.train(base, "cpu", root=cifar_root, use_cache=False, progress=False)
    b = T.train(dataclasses.replace(base, ema_every=0), "cpu", root=cifar_root, use_cache=False, progress=False)
    c = T.train(dataclasses.replace(base, mixup_alpha=0.4), "cpu", root=cifar_root, use_cache=False, progress=False)
    assert not torch.allclose(a.head.weight, b.head.weight) and not torch.allclose(a.head.weight, c.head.weight)


def test_eval_ds_reports_test_accuracy_per_epoch(cifar_root):
    cfg = tiny_config(epochs=1)
    test = T.test_data(cfg, cifar_root)
    seen = []
    model = T.train(cfg, "cpu", root=cifar_root, use_cache=False, progress=False, eval_ds=test,
                    callback=lambda e, m: seen.append(m))
    assert seen[0]["test_acc"] == pytest.approx(T.evaluate(model, test, "cpu")["accuracy"])
    assert seen[0]["train_s"] > 0


@pytest.mark.slow
def test_quick_main_model_real_cifar10(caller_cache):
    """The quick profile's main model (FastNet) on the real data, no label smoothing, no test-time
    augmentation: measured numbers in benchmarks/train.py's report. Shared with the chapters through the cache."""
    test = _real_cifar10_test()
    torch.set_num_threads(2)
    model = T.trained_model("main", "cifar10", profile="quick", device="cpu", progress=False)
    assert model.train_info["config"]["arch"] == "fastnet" and model.train_info["config"]["label_smoothing"] == 0
    acc = T.evaluate(model, test, "cpu")["accuracy"]
    print(f"quick main model (FastNet): test accuracy {acc:.4f}")
    assert acc > QUICK_MAIN_MIN_ACCURACY


# >= 89 % on the original CIFAR-10 without label smoothing or test-time augmentation (85 % on the JPEG copy
# until 2026-12-06; the recipe gives 89.9 % on the original images, shipped as quick-fastnet-cifar10-standard-s0)
QUICK_MAIN_MIN_ACCURACY = 0.89


def test_compile_switch_goes_through_torch_compile_and_is_recorded(cifar_root, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)  # the switch, not inductor
    model = T.train(tiny_config(epochs=1, n_train=32), "cpu", root=cifar_root, use_cache=False, progress=False,
                    compile=True)
    assert len(compiled) == 1 and model.train_info["precision"]["compile"] is True


def test_smoke_profile_is_the_full_recipe_at_toy_scale():
    """The dry run's profile: every full-profile architecture, width, loss and attack, one short epoch."""
    from flatnb.config import budgets, recipes, smoke

    for (arch, ds, recipe) in recipes.TABLE:
        full, toy = (T.config_for(arch, ds, recipe, p) for p in ("full", "smoke"))
        assert (toy.arch, toy.width, toy.recipe, toy.model_kw, toy.pgd_steps, toy.sam_rho,
                toy.label_smoothing, toy.lr) == \
            (full.arch, full.width, full.recipe, full.model_kw, full.pgd_steps, full.sam_rho,
             full.label_smoothing, full.lr)
        assert toy.epochs == 1 and toy.n_train <= smoke.IMAGES and toy.profile == "smoke"
        assert toy.key() != full.key()  # never mistaken for a full-profile checkpoint
    assert recipes.resolve_arch("main", "smoke") == "resnet18"
    assert budgets.ZOO["smoke"] == budgets.ZOO["full"]
    # sizes: the full values through the caps, by key name; grids, flags and scale tuples untouched
    s = budgets.sizes("03_local_bound", "smoke")
    f = budgets.sizes("03_local_bound", "full")
    assert s["n_radius"] == 24 and s["radius_steps"] == 5 and s["radius_iter"] == 3 and s["small_epochs"] == 1
    assert s["small_train"] == 256 and s["restarts"] == 1 and s["radius_scales"] == f["radius_scales"]
    assert budgets.sizes("01_relative_flatness", "smoke") == dict(hidden=256, n_check=24, train_steps=5)
    assert budgets.sizes("05_uncanny_valley", "smoke")["grid"] == budgets.sizes("05_uncanny_valley", "full")["grid"]
    assert budgets.sizes("10_architectures", "smoke")["cifar100"] is True
    assert budgets.sizes("05_uncanny_valley", "smoke")["confident"] == 0.0  # the confident branch still runs
    assert budgets.sizes("13_atlas", "smoke")["n_basin"] == 128
    assert all(set(budgets.sizes(st, "smoke")) == set(budgets.sizes(st, "full")) for st in budgets.SIZES)
    with pytest.raises(ValueError, match="smoke"):
        T.config_for("main", "cifar10", "standard", "paper")


def test_quick_and_full_runs_never_load_the_smoke_module():
    """Run records fingerprint the modules a chapter loaded: tuning the smoke profile must not make a
    quick or full record stale, so only a smoke run may import flatnb.config.smoke."""
    import subprocess
    import sys

    code = ("import sys; from flatnb.book import chapter; from flatnb.config import budgets, recipes; from flatnb.training import train; "
            "[budgets.sizes(s, p) for s in budgets.SIZES for p in ('quick', 'full')]; "
            "[train.config_for(a, d, r, p) for (a, d, r) in recipes.TABLE for p in ('quick', 'full')]; "
            "print('flatnb.config.smoke' in sys.modules); budgets.sizes('05_uncanny_valley', 'smoke'); "
            "print('flatnb.config.smoke' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_early_stopped_checkpoint_is_the_longer_runs_weights_and_is_loaded_not_retrained(cifar_root):
    cfg = fast_tiny(epochs=3, n_train=48)
    early = dataclasses.replace(cfg, stop_epochs=1)
    assert early.key("d") != cfg.key("d") and early.last_epoch == 1 and cfg.last_epoch == 3
    alone = T.train(early, "cpu", root=cifar_root, use_cache=False, progress=False)  # trains 1 of the 3 epochs
    assert len(alone.train_info["history"]) == 1
    full = T.train(cfg, "cpu", root=cifar_root, progress=False, snapshots=(1,))
    assert len(full.train_info["history"]) == 3
    seen = []  # the snapshot is a finished checkpoint: loading it trains nothing
    got = T.train(early, "cpu", root=cifar_root, progress=False, callback=lambda e, m: seen.append(e))
    assert seen == [] and got.train_info["config"]["stop_epochs"] == 1
    for k, v in _state(alone).items():  # the same schedule's first epoch, bit for bit on the CPU
        assert torch.equal(got.state_dict()[k], v), k
    assert not torch.equal(got.head.weight, full.head.weight)
    with pytest.raises(ValueError, match="snapshots must be"):
        T.train(cfg, "cpu", root=cifar_root, progress=False, snapshots=(3,))
    with pytest.raises(ValueError, match="stop_epochs"):
        dataclasses.replace(cfg, stop_epochs=4)


def test_logit_norm_trains_on_normalised_logits(cifar_root):
    cfg = fast_tiny(epochs=1, n_train=48, logit_norm=0.05)
    z = torch.tensor([[3.0, -1.0, 0.5], [0.0, 0.0, 2.0]], dtype=torch.float64)
    want = z / (0.05 * z.norm(dim=1, keepdim=True))
    assert torch.allclose(T._train_logits(z, cfg), want, rtol=1e-6)
    assert torch.equal(T._train_logits(z, dataclasses.replace(cfg, logit_norm=0.0)), z)
    a = T.train(cfg, "cpu", root=cifar_root, use_cache=False, progress=False)
    b = T.train(dataclasses.replace(cfg, logit_norm=0.0), "cpu", root=cifar_root, use_cache=False, progress=False)
    assert not torch.allclose(a.head.weight, b.head.weight)
    with pytest.raises(ValueError, match="logit_norm"):
        dataclasses.replace(cfg, recipe="pgd_at")
