"""benchmarks/zoo.py's FLOP count (the numerator of every "share of the GEMM peak" it reports)."""
import importlib.util
from pathlib import Path

import torch

from flatnb.training import train as T

_spec = importlib.util.spec_from_file_location("bench_zoo", Path(__file__).parents[1] / "benchmarks" / "zoo.py")
bench_zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_zoo)


def test_total_flops_counts_a_matmul_and_its_backward_by_hand():
    m, k, n = 7, 5, 3
    a = torch.randn(m, k, requires_grad=True)
    b = torch.randn(k, n, requires_grad=True)
    with bench_zoo.TotalFlops() as fc:
        (a @ b).sum().backward()
    # forward 2mkn; backward: grad_a = g @ b^T (2mnk) and grad_b = a^T @ g (2kmn)
    assert fc.total == 3 * 2 * m * k * n


def test_total_flops_agrees_with_flop_counter_mode_on_standard_training():
    cfg = T.config_for("fastnet", "cifar10", "standard", "quick")
    cpu = torch.device("cpu")
    assert bench_zoo.image_flops(cfg, cpu, batch=4) == bench_zoo.flop_counter_flops(cfg, cpu, batch=4)


def test_total_flops_counts_adversarial_training_where_flop_counter_mode_raises():
    cpu = torch.device("cpu")
    std = T.config_for("fastnet", "cifar10", "standard", "quick")
    at = T.config_for("fastnet", "cifar10", "pgd_at", "quick")
    assert at.pgd_steps >= 1 and at.width == std.width
    # each attack step is a forward pass and an input gradient: more than the training step alone
    assert bench_zoo.image_flops(at, cpu, batch=4) > bench_zoo.image_flops(std, cpu, batch=4)
