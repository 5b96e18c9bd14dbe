"""`deflect train` with a margin in the transfer terms (a one-off experiment).

Each transfer term becomes max(ℓ_i(x + δ_j) − ℓ_i(x) + r·ℓ_i(x), 0) per image instead of
max(ℓ_i(x + δ_j) − ℓ_i(x), 0): it keeps asking until model j's perturbation *lowers* model i's loss
to (1 − r) of its clean value, so it goes on pulling model i's input gradient against model j's past
orthogonal, where the clamp at zero lets go (`results/fashion-mnist-n8.md`, "Where the sets of 3
and 8 differ"). The margin r·ℓ_i(x) is detached, so the clean loss enters the gradient as in the
preset (live, coefficient 1), and it is relative, so confident images (ℓ near 0) are not pushed
forever. It patches `clamped_increase` in the training and validation paths for this process only
and is not a deflect option. Run:
`python results/transfer-margin.py R train --n 8 --step fast ...` (R, then deflect's CLI arguments).
"""

import sys

import torch

from deflect.launch import main
from deflect.train import fast, grow, losses


def patch(ratio: float) -> None:
    """Every caller of `clamped_increase` compares with the clean loss less `ratio` of its detached value."""
    original = losses.clamped_increase

    def with_margin(perturbed: torch.Tensor, clean_loss: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        return original(perturbed, clean_loss - ratio * clean_loss.detach(), clamp)

    for module in (losses, fast, grow):
        if getattr(module, "clamped_increase", None) is not original:
            raise SystemExit(f"transfer-margin.py: {module.__name__} no longer uses clamped_increase")
        module.clamped_increase = with_margin


if __name__ == "__main__":
    patch(float(sys.argv[1]))
    sys.argv = ["deflect", *sys.argv[2:]]
    main()
