"""The CUDA paths: the same step, the same evaluation copies and a whole run on a GPU as on the CPU.

Skipped where no CUDA device is present (CI); run them on a GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import deflect
from deflect.bench import BenchSettings, default_settings, step_rates
from deflect.config import make_config
from deflect.data import dataset_info
from deflect.inference import inference_copy
from deflect.models import build_model
from deflect.store import Store
from deflect.train.disjoint import autocast
from deflect.train.fast import fast_disjoint_loss
from deflect.train.losses import ActiveTerms, disjoint_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 matmuls would round at 1e-3; the comparisons below are of float32 arithmetic."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _set(n: int, width: int = 8, batch: int = 32):
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    models = [build_model("cnn", info, width=width).train() for _ in range(n)]
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    return models, x, y, make_config(n, "fashion-mnist", width=width)


def _step(fn, models, x, y, cfg, sample, device: str, bf16: bool = False):
    models = [copy.deepcopy(m).to(device) for m in models]
    with autocast(torch.device(device), bf16):
        parts = fn(models, x.to(device), y.to(device), cfg, ActiveTerms.all_enabled(cfg), sample)
    parts.total.backward()
    grads = torch.cat([p.grad.flatten().cpu() for m in models for p in m.parameters()])
    return float(parts.total.detach()), float(parts.transfer2.detach()), grads


@pytest.mark.parametrize("n, sample", [(3, None), (5, [0, 2, 4])])
def test_reference_step_on_cuda_equals_cpu(n: int, sample) -> None:
    models, x, y, cfg = _set(n)
    cpu_total, cpu_t2, cpu_grads = _step(disjoint_loss, models, x, y, cfg, sample, "cpu")
    gpu_total, gpu_t2, gpu_grads = _step(disjoint_loss, models, x, y, cfg, sample, "cuda")
    assert cpu_t2 > 0  # the tanh term, the most rounding-sensitive one, is live
    assert gpu_total == pytest.approx(cpu_total, rel=1e-3, abs=1e-3)
    assert torch.allclose(gpu_grads, cpu_grads, atol=1e-3, rtol=1e-2)


def test_fast_step_on_cuda_equals_the_reference() -> None:
    models, x, y, cfg = _set(3)
    ref_total, _, ref_grads = _step(disjoint_loss, models, x, y, cfg, None, "cuda")
    fast_total, _, fast_grads = _step(fast_disjoint_loss, models, x, y, cfg, None, "cuda")
    assert fast_total == pytest.approx(ref_total, rel=1e-4, abs=1e-4)
    assert torch.allclose(fast_grads, ref_grads, atol=1e-4, rtol=1e-4)


def test_bf16_step_is_finite_and_close_to_float32() -> None:
    models, x, y, cfg = _set(3)
    total, _, grads = _step(disjoint_loss, models, x, y, cfg, None, "cuda")
    bf_total, _, bf_grads = _step(disjoint_loss, models, x, y, cfg, None, "cuda", bf16=True)
    assert torch.isfinite(bf_grads).all()
    assert bf_total == pytest.approx(total, rel=0.1)
    # bf16 keeps 8 bits of mantissa: the update direction, not its digits, must survive
    assert F.cosine_similarity(bf_grads, grads, dim=0) > 0.9


@pytest.mark.parametrize(("arch", "dataset"), [("cnn", "fashion-mnist"), ("preact-resnet18", "cifar10")])
def test_inference_copy_on_cuda_matches_the_model(arch: str, dataset: str) -> None:
    info = dataset_info(dataset)
    torch.manual_seed(0)
    model = build_model(arch, info, width=8).cuda().eval()
    x = torch.rand(8, info.channels, info.size, info.size, device="cuda")
    y = torch.arange(8, device="cuda") % 10
    fast = inference_copy(model, "cuda")
    assert next(fast.parameters()).is_cuda

    def grad(net):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
        return g

    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert torch.allclose(grad(fast), grad(model), atol=1e-5, rtol=1e-3)


def test_a_digits_run_on_cuda_trains_stores_and_reloads(tmp_path) -> None:
    store = Store(tmp_path / "deflect.db")
    run = store.get_run(deflect.train(make_config(3, "digits", epochs=6, device="cuda"), store))
    assert run.status == "finished" and "cuda" in run.device
    assert min(run.clean_acc) >= 85
    models = deflect.load_set(run.id, store)  # checkpoints load on the CPU
    test = deflect.load_dataset("digits", "test")
    x, y = test.batch(torch.arange(len(test)))
    for model, stored in zip(models, run.clean_acc, strict=True):
        with torch.no_grad():
            acc = 100 * float((model.eval()(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(stored, abs=1.0)


def test_bench_times_the_paper_preset_with_bf16() -> None:
    settings = default_settings("cuda", "paper-cifar10")
    rates = step_rates(BenchSettings(**{**settings.__dict__, "steps": 1}), 3, torch.device("cuda"))
    assert set(rates) == {"independent", "reference", "fast", "cheap", "fast_k5", "fast_k5_r50", "reference_bf16"}
    assert min(rates.values()) > 0 and rates["independent"] > rates["reference"]
