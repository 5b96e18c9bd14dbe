"""`deflect train` with the transfer terms measured as a central difference (a one-off experiment).

Each transfer term of the fast step becomes max(ℓ_i(x + δ_j) − ℓ_i(x − δ_j), 0) per image instead of
max(ℓ_i(x + δ_j) − ℓ_i(x), 0): the slope of model i's loss along model j's attack direction, with
no push up on model i's clean loss (`results/fashion-mnist-unclamped.md` found that push to be what
holds a set of 8 at orthogonal gradients). It patches the CPU path of the fast step
(`--step fast`, with the per-image clamp) for this process only and is not a deflect option; the
validation objective is unpatched, so run it with `--select last`. Run:
`python results/central-difference.py train --n 8 --step fast ... --select last` (deflect's CLI
arguments).
"""

import inspect
import sys

from deflect.launch import main
from deflect.train import fast

PATCHES = [
    ("                values = [plain_loss(models[i](xt + d), yt, per_image) for d in deltas]\n",
     "                values = [plain_loss(models[i](xt + d), yt, per_image) for d in deltas]\n"
     "                mirrored = [plain_loss(models[i](xt - d), yt, per_image) for d in deltas]\n"),
    ("        for (term, j), value in zip(keys, values, strict=True):",
     "        for (term, j), value, base in zip(keys, values, mirrored, strict=True):"),
    ('(t1 if term == "t1" else t2)[(i, j)] = clamped_increase(value, clean_i, clamps(cfg))',
     '(t1 if term == "t1" else t2)[(i, j)] = clamped_increase(value, base, clamps(cfg))'),
]


def patch() -> None:
    """Rebuild `fast_disjoint_loss` from its source with the mirrored baseline."""
    source = inspect.getsource(fast.fast_disjoint_loss)
    for old, new in PATCHES:
        if old not in source:
            raise SystemExit(f"central-difference.py: the fast step changed; cannot find {old.strip()!r}")
        source = source.replace(old, new)
    # exec of deflect's own source, patched above, in the fast module's namespace
    exec(compile(source, fast.__file__, "exec"), fast.__dict__)


if __name__ == "__main__":
    patch()
    sys.argv = ["deflect", *sys.argv[1:]]
    main()
