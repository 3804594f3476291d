import pytest
import torch

from flatnb import runtime


def test_draw_uses_the_generators_device_then_moves():
    # CUDA refuses a CPU generator (the H100 run of chapter 2 failed so); 'meta' stands in for
    # the device here: the draw happens on the generator's device and the result is moved
    g = torch.Generator().manual_seed(3)
    out = runtime.draw(torch.randn, (2, 3), "meta", torch.float64, g)
    assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == (2, 3)
    # same numbers as a plain draw from the same seed
    a = runtime.draw(torch.randn, (5,), "cpu", torch.float32, torch.Generator().manual_seed(3))
    assert torch.equal(a, torch.randn(5, generator=torch.Generator().manual_seed(3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_inputs_in_attacks_and_bounds():
    from flatnb import attacks, models
    from flatnb.curvature import bounds

    model = models.build("resnet18", 10, width=8).cuda().eval()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    g = torch.Generator().manual_seed(0)
    res = attacks.pgd(model, x, y, 0.1, steps=2, norm="l2", random_start=True, generator=g, warn=False)
    assert res.x_adv.device.type == "cuda"
    assert bounds.local_lipschitz(model.features, x, n_iter=2, generator=g).device.type == "cuda"


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path):
    import os

    import pytest

    from flatnb import runtime

    path = tmp_path / "sub" / "record.json"
    runtime.atomic_write_text(path, "first ✓\n")
    runtime.atomic_write_bytes(path, b"second\n")
    assert path.read_bytes() == b"second\n" and os.listdir(path.parent) == ["record.json"]
    assert (path.stat().st_mode & 0o777) == 0o644

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")  # ENOSPC

    with pytest.raises(OSError, match="no space left on the device while writing"):
        runtime._atomic_write(path, broken)
    assert path.read_bytes() == b"second\n" and os.listdir(path.parent) == ["record.json"]
