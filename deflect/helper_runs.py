"""Runs deflect trains for its own attackers (the static adversary's model, the method-aware
attacker's set): trained once per recipe, kept as helper runs (listed, never 'latest') and reused.

Both attackers share the cache rule (`deflect.config.same_recipe`, as `deflect reproduce` does):
the training fields alone, so an older helper run that lacks a newer field is still found.
"""

from __future__ import annotations

from deflect.config import TrainConfig, same_recipe
from deflect.store import HELPER_ROLE_KEY, Run, Store
from deflect.train import Callbacks, train


def helper_run(store: Store, cfg: TrainConfig, role: str, message: str,
               callbacks: Callbacks | None = None) -> tuple[Run, bool]:
    """The newest finished helper run of `role` trained with `cfg`'s recipe, else one trained now;
    with whether it was trained by this call."""
    for r in reversed(store.list_runs()):
        if r.status == "finished" and r.config.get(HELPER_ROLE_KEY) == role and same_recipe(r.config, cfg):
            return r, False
    user = callbacks or Callbacks()

    def mark(new: Run, first_epoch: int) -> None:
        """Marked at once, so that even an interrupted helper run is never 'latest'."""
        store.update_run(new.id, config={**new.config, HELPER_ROLE_KEY: role}, message=message)
        if user.on_start:
            user.on_start(new, first_epoch)

    run_id = train(cfg, store, Callbacks(on_start=mark, on_batch=user.on_batch, on_epoch=user.on_epoch))
    return store.get_run(run_id), True
