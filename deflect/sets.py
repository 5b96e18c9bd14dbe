"""Loading a trained set back: `load_set(run)` from a run id or a run directory."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from deflect.checkpoint import MANIFEST, load_tensors, model_file, read_json
from deflect.config import TrainConfig
from deflect.data import dataset_info
from deflect.errors import DeflectError
from deflect.models import build_model
from deflect.store import Store

__all__ = ["load_set", "run_config"]


def run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    return TrainConfig.from_stored(read_json(path), str(path))


def mismatch_error(file: Path, cfg: TrainConfig, exc: RuntimeError) -> DeflectError:
    """One line for a checkpoint that does not fit the run's model: torch's message is a page long,
    its last line names the first mismatch."""
    lines = str(exc).strip().splitlines()
    return DeflectError(f"{file} does not match the run's model ({cfg.arch}, width {cfg.width}): "
                        f"{lines[-1].strip() if lines else type(exc).__name__}")


def load_set(run: str | os.PathLike, db: str | os.PathLike | Store | None = None) -> list[nn.Module]:
    """The models of a run, in eval mode on CPU, taking [0,1] inputs and returning logits.

    `run` is a run id (or unique prefix, or 'latest') in the database, or a run directory.
    Every file is checked against its recorded sha256 before it is read.
    """
    path = Path(run)
    if not path.is_dir() and len(path.parts) > 1:  # a run id holds no path separator
        raise DeflectError(f"{path} is not a run directory" if path.exists() else f"no run directory {path}")
    if path.is_dir():
        run_dir = path
        manifest = run_dir / MANIFEST
        digests = read_json(manifest) if manifest.exists() else {}
        if not digests:
            raise DeflectError(f"{run_dir} has no {MANIFEST}; its checkpoints cannot be verified")
    else:
        store = db if isinstance(db, Store) else Store(db, create=False)
        record = store.get_run(str(run))
        run_dir = Path(record.run_dir)
        digests = store.checkpoint_digest_sets(record.id)
    cfg = run_config(run_dir)
    info = dataset_info(cfg.dataset)
    models = []
    for i in range(cfg.n):
        file = model_file(run_dir, i)
        if file.name not in digests:
            raise DeflectError(f"{file} has no recorded checkpoint (the run saved no epoch yet)")
        model = build_model(cfg.arch, info, cfg.normalize, cfg.width)
        try:
            model.load_state_dict(load_tensors(file, digests[file.name]))
        except RuntimeError as exc:
            raise mismatch_error(file, cfg, exc) from exc
        models.append(model.eval())
    return models
