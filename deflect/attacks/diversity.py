"""Input transformations that make adversarial examples transfer: DI and TI.

* DI (input diversity, Xie et al. 2019): with probability ``p`` each image is shrunk by a random
  factor and zero-padded back to its size at a random offset before the gradient is taken, so the
  perturbation cannot rely on exact pixel positions of one model.
* TI (translation invariance, Dong et al. 2019): the input gradient is convolved with a Gaussian
  kernel, which approximates averaging the gradient over small translations of the image.

DI here keeps the image size (shrink + pad, rather than the original enlarge + pad), so it works
with any model, including ones with a fixed-size linear head; the result is a convex combination
of pixels and zeros, hence stays in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def input_diversity(x: Tensor, prob: float, min_scale: float, generator: torch.Generator | None = None) -> Tensor:
    """Per image, with probability ``prob``: resize to ``s×`` its size, ``s`` a random integer size in
    ``[floor(min_scale·H), H]``, and zero-pad back to ``H×W`` at a random offset (differentiable in ``x``).

    Implemented as one bilinear ``grid_sample`` with a per-image affine map, which equals
    ``interpolate(bilinear, align_corners=False)`` followed by ``pad``; ``generator`` (if given) must
    live on ``x``'s device.
    """
    if prob <= 0 or x.dim() != 4:
        return x
    n, _, h, w = x.shape
    dev = x.device
    low = max(1, math.floor(min_scale * h))
    size_h = torch.randint(low, h + 1, (n,), generator=generator, device=dev).to(x.dtype)
    size_w = torch.clamp(torch.round(size_h * w / h), 1, w)
    top = torch.floor(torch.rand(n, generator=generator, device=dev, dtype=x.dtype) * (h - size_h + 1))
    left = torch.floor(torch.rand(n, generator=generator, device=dev, dtype=x.dtype) * (w - size_w + 1))
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w / size_w
    theta[:, 0, 2] = (w - 2 * left) / size_w - 1
    theta[:, 1, 1] = h / size_h
    theta[:, 1, 2] = (h - 2 * top) / size_h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    apply = torch.rand(n, generator=generator, device=dev) < prob
    return torch.where(apply.view(n, 1, 1, 1), moved, x)


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """A normalised ``size×size`` Gaussian (σ in pixels); ``size`` odd so the gradient is not shifted."""
    radius = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(radius**2) / (2 * sigma**2))
    kernel = torch.outer(g, g)
    return kernel / kernel.sum()


def smooth_gradient(grad: Tensor, size: int, sigma: float) -> Tensor:
    """TI: convolve each channel of ``grad`` with :func:`gaussian_kernel` (zero padding, same size).

    ``size <= 1`` leaves the gradient unchanged.
    """
    if size <= 1 or grad.dim() != 4:
        return grad
    c = grad.shape[1]
    kernel = gaussian_kernel(size, sigma).to(grad).expand(c, 1, size, size)
    return F.conv2d(grad, kernel, padding=size // 2, groups=c)
