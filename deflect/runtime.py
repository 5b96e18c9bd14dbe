"""Process-wide numeric and memory settings deflect needs on CPU, and the layout models train in."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are still mapped and unmapped each time
_TRIM_THRESHOLD = 256 << 20  # free heap kept for reuse before glibc gives it back to the system
_tuned: bool | None = None


@contextlib.contextmanager
def fast_cpu_math() -> Iterator[None]:
    """Within the block (or the decorated call), flush denormal floats to zero; and let freed tensor
    buffers be reused (:func:`reuse_freed_memory`, process-wide, once).

    Input gradients of a batch-mean loss are tiny, and their double backward produces denormal
    numbers that x86 CPUs handle ~50x slower (measured: a 6-model digits epoch 140 s → 8 s).
    Flushing them changes no result at float32 precision that the losses depend on. The setting is
    per thread: it is scoped on the calling thread (a notebook's own float32 code after a deflect call
    keeps its denormals), threads started inside the block (the crafting workers, torch's intra-op
    pool when it starts there) inherit it and keep it, and threads started before it keep theirs.
    """
    before = flushes_denormals()
    torch.set_flush_denormal(True)
    reuse_freed_memory()
    try:
        yield
    finally:
        if not before:
            torch.set_flush_denormal(False)


def flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero now (torch has no getter: a probe)."""
    return float((torch.tensor([1e-39]) * 1.0).item()) == 0.0


def reuse_freed_memory() -> bool:
    """Keep glibc from unmapping freed tensor buffers, so the next step reuses them (once per process).

    glibc serves every block above its mmap threshold (128 KiB, raised only by frees it has seen)
    with a fresh mmap and unmaps it on free, so each activation of a CPU training or crafting step
    (a 128×16×28×28 float tensor is 6.4 MB) page-faults on its first touch, again every step: in a
    profile of a PGD step the zero fill of the max-pool gradient took 3-16 ms of a 30-50 ms step.
    Raising the threshold to glibc's maximum and the trim threshold to 256 MiB sped the step up
    1.2-1.4× on the 2-core CPU (README, "Performance"). The memory stays with the process (its peak
    is unchanged). No effect off glibc (jemalloc/tcmalloc preloaded, macOS, Windows), or with
    DEFLECT_SYSTEM_MALLOC=1 set.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if sys.platform.startswith("linux") and not os.environ.get("DEFLECT_SYSTEM_MALLOC"):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _tuned = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return _tuned


def training_layout(models: Sequence[nn.Module], device: torch.device) -> list[nn.Module]:
    """The models in the memory layout their training steps run fastest in: channels-last on CPU.

    oneDNN's CPU convolutions, BatchNorm and max-pooling work natively in NHWC; an NCHW model pays
    slower kernels (max-pooling most, several times slower in a profile of a growth step).
    `deflect bench` times both layouts in one process (ratios `nhwc_vs_nchw_*`). On CUDA the layout
    is left as it is: it was not measured there. The function is the same up to float rounding, and
    checkpoints are written contiguous, so a set trained either way loads the same.
    """
    if not changes_layout(device):
        return list(models)
    return [m.to(memory_format=torch.channels_last) for m in models]


def changes_layout(device: torch.device) -> bool:
    """Whether `training_layout` converts models on `device` (the bench times an NCHW twin only there:
    elsewhere the twin would time the same step twice)."""
    return device.type == "cpu"
