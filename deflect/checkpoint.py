"""Checkpoints as safetensors + JSON, written atomically and verified by sha256.

No pickle anywhere: a shared checkpoint is data, never code. Every file is written to a
temporary name and renamed, so a crash leaves either the old file or the new one, and its
sha256 is recorded (in the database and in the run's manifest) and checked before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from deflect.errors import DeflectError

MANIFEST = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> str:
    """Write bytes via temp file + fsync + rename; return their sha256.

    The temp file is created with the process's umask (as a plain open would), not mkstemp's 0600,
    so a run folder can be shared with a group like any other file the user writes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DeflectError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return sha256_bytes(data)


def _temp_file(path: Path) -> tuple[int, str]:
    """A new, exclusive temp file beside `path`, mode 0666 less the umask."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise DeflectError(f"cannot write {path}: {exc.strerror or exc}") from exc
    raise DeflectError(f"cannot write {path}: no free temp file name beside it")


def encode_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """Safetensors bytes of tensors (contiguous CPU copies) with JSON metadata, not yet written.

    Encoding apart from writing lets the trainer record a file's sha256 before the file replaces
    the previous one, so the file on disk always matches a recorded digest.
    """
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"deflect": json.dumps(dict(meta or {}), sort_keys=True)}
    return st_save(flat, metadata=metadata)


def _read_verified(path: Path, sha256: str | Collection[str] | None) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise DeflectError(f"checkpoint {path} is missing") from exc
    except OSError as exc:
        raise DeflectError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    allowed = {sha256} if isinstance(sha256, str) else set(sha256) if sha256 is not None else None
    if allowed is not None and sha256_bytes(data) not in allowed:
        raise DeflectError(
            f"checkpoint {path} fails its sha256 check (the file was changed or damaged); refusing to load it"
        )
    return data


def load_tensors(path: Path, sha256: str | Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing it unless its sha256 is the recorded one (or one of them)."""
    return load_tensors_meta(path, sha256)[0]


def load_tensors_meta(path: Path, sha256: str | Collection[str] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                       dict[str, Any]]:
    """Tensors and deflect's JSON metadata of a verified safetensors file (the header is data: JSON only)."""
    data = _read_verified(path, sha256)
    try:
        tensors = st_load(data)
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        meta = json.loads((header.get("__metadata__") or {}).get("deflect", "{}"))
    except (SafetensorError, ValueError, RuntimeError, struct.error, AttributeError) as exc:
        raise DeflectError(f"checkpoint {path} is not a valid safetensors file: {exc}") from exc
    if not isinstance(meta, dict):
        raise DeflectError(f"checkpoint {path} has malformed deflect metadata")
    for name, tensor in tensors.items():  # NaN weights give meaningless accuracies, not an error, further on
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DeflectError(f"checkpoint {path} holds non-finite values (NaN or inf) in {name!r}")
    return tensors, meta


def write_json(path: Path, obj: Any) -> str:
    return atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise DeflectError(f"{path} is missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DeflectError(f"{path} is not readable JSON: {exc}") from exc


def update_manifest(run_dir: Path, digests: Mapping[str, str]) -> None:
    """Record file digests next to the files, so a run directory verifies without the database."""
    path = run_dir / MANIFEST
    current = read_json(path) if path.exists() else {}
    current.update(digests)
    write_json(path, current)


def model_file(run_dir: Path, index: int) -> Path:
    return run_dir / f"model_{index}.safetensors"
