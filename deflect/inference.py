"""Attack-ready copies of trained models: what evaluation crafts attacks on and scores with.

Crafting a transfer matrix is n sources × steps forward/backward passes that need the *input*
gradient only, through models in eval mode. An evaluation copy therefore

* folds each eval-mode BatchNorm into the convolution before it (``torch.fx`` ``fuse``): one op
  instead of two in every forward and backward;
* applies ReLU after max-pooling instead of before: ``relu(maxpool(z)) == maxpool(relu(z))`` and
  both give the same input gradient, on a quarter of the elements;
* freezes the parameters, so autograd never computes or stores weight gradients;
* on CPU, stores convolutions channels-last (oneDNN's native layout), and replaces a global
  average pool by :class:`GlobalAvgPool`, whose gradient keeps its input's layout: autograd's
  gives the last ReLU an NCHW gradient against a channels-last input, and that ReLU backward
  took 2-3 ms of a ~30 ms PGD step instead of 0.2 (the step gains 1.01-1.09×).

Measured on a 2-core CPU (Fashion-MNIST small CNN, width 16, PGD-7, batch 128): 1.8-1.9× the
images/s of the same loop on the unmodified models (``deflect bench`` reports the figure). The
copies compute the same function up to float rounding: a handful of gradient signs at exactly
zero-crossings can differ, so a few pixels of a PGD example may land elsewhere in the ε-ball.
A batched pass over all n sources (``torch.func`` vmap) was measured too: 0.95× on CPU, so the
per-model loop stays. Models that ``torch.fx`` cannot trace are used as frozen copies unchanged.

:func:`bf16_crafting` wraps a copy so an attack's forward and backward run under bf16 autocast
while its logits (and so the attack's loss) stay float32. Only crafting uses it: every example is
scored by the float32 copies. On a CPU with native bf16 (AVX512-BF16 / AMX) an input-gradient step
of the small CNN runs about 2× faster, and the PGD-20 black-box means of three Fashion-MNIST sets
moved by at most 0.25 points against float32 crafting (README, "Performance").
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from deflect.errors import DeflectError

# oneDNN's activations for a small CNN stay in L2 at 128 images; 256 measured 1.2× slower on CPU.
CPU_EVAL_BATCH = 128
DEVICE_EVAL_BATCH = 256


def whole_number(value: object) -> int | None:
    """`value` as an int when it is a whole number of any integer type (numpy's too; not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def eval_batch_size(device: torch.device | str, requested: int | None = None) -> int:
    """The evaluation batch: the caller's, else the size measured fastest for the device."""
    if requested is not None:
        whole = whole_number(requested)
        if whole is None or whole < 1:
            raise DeflectError(f"batch_size must be a whole number of at least 1, got {requested!r}")
        return whole
    return CPU_EVAL_BATCH if torch.device(device).type == "cpu" else DEVICE_EVAL_BATCH


def _relu_after_pool(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``ReLU → MaxPool2d`` as ``MaxPool2d → ReLU`` (exact: max commutes with relu)."""
    modules = dict(gm.named_modules())
    for pool in list(gm.graph.nodes):
        if pool.op != "call_module" or not isinstance(modules.get(pool.target), nn.MaxPool2d):
            continue
        relu = pool.args[0]
        if not (isinstance(relu, fx.Node) and relu.op == "call_module"
                and isinstance(modules.get(relu.target), nn.ReLU) and len(relu.users) == 1):
            continue
        pool.args = (relu.args[0], *pool.args[1:])
        pool.replace_all_uses_with(relu)
        relu.args = (pool,)
        pool.append(relu)
    gm.graph.lint()
    gm.recompile()
    return gm


class _SpatialMean(torch.autograd.Function):
    """Mean over H and W (kept as 1×1); the backward is a broadcast view, so it has any layout."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor) -> torch.Tensor:
        ctx.shape = z.shape  # type: ignore[attr-defined]
        return z.mean(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        shape = ctx.shape  # type: ignore[attr-defined]
        return (grad / (shape[2] * shape[3])).expand(shape)


class GlobalAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` with a layout-preserving backward (same values, same gradient)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _SpatialMean.apply(z)


def _swap_global_pools(net: nn.Module) -> None:
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            owner, _, attr = name.rpartition(".")
            setattr(net.get_submodule(owner) if owner else net, attr, GlobalAvgPool())


def inference_copy(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A frozen eval-mode copy of ``model`` on ``device``, optimised for input-gradient work.

    The caller's model is never modified (not moved, not switched to eval mode). A model that is
    already such a copy on ``device`` is returned as it is, so callers that prepare their models once
    (an ε sweep, a simulation) pay for the copies once.
    """
    dev = torch.device(device)
    if is_inference_copy(model) and _device_of(model) == _normalise(dev):
        return model
    net = copy.deepcopy(model).to(dev).eval()
    try:
        from torch.fx.experimental.optimization import fuse

        net = _relu_after_pool(fuse(net, inplace=True))
    except Exception:  # noqa: BLE001 - untraceable models (data-dependent control flow) stay as they are
        net = copy.deepcopy(model).to(dev).eval()
    net.requires_grad_(False)
    if dev.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in net.modules()):
        net = net.to(memory_format=torch.channels_last)
        _swap_global_pools(net)
    net._deflect_inference_copy = True  # type: ignore[assignment]
    return net


def is_inference_copy(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`inference_copy` (frozen, eval mode, folded)."""
    return bool(getattr(model, "_deflect_inference_copy", False))


def _device_of(model: nn.Module) -> torch.device | None:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else _normalise(tensor.device)


def _normalise(dev: torch.device) -> torch.device:
    """cuda and cuda:0 name the same device when only the default one is used."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively on `device` (CUDA with bf16, or a CPU whose oneDNN has bf16)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class Bf16Crafting(nn.Module):
    """A model whose forward runs under bf16 autocast and returns float32 logits (for crafting only)."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def require_bf16(device: torch.device | str) -> None:
    """A one-line error where bf16 is not native: emulated bf16 is slower than float32 and still rounds."""
    dev = torch.device(device)
    if not bf16_supported(dev):
        raise DeflectError(f"--bf16 needs native bf16 on {dev.type}: a CUDA GPU with bf16 or a CPU with "
                           "AVX512-BF16/AMX (this one has neither); evaluate in float32")


def bf16_crafting(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` wrapped for bf16 crafting on `device` (see :func:`require_bf16`)."""
    require_bf16(device)
    return Bf16Crafting(model, torch.device(device).type)
