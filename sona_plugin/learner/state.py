"""The learner's saved state: one safetensors file (arrays, plus JSON in its header),
written atomically (temp file, fsync, rename over, fsync the directory).

A copy is written into every published version's directory (so a rollback finds the
EWC++ memory, reward baseline and dreams that belong to those weights) and one at
``state_dir/learner.safetensors`` after every cycle (so a restart knows which records
were already used, even by cycles whose candidate was refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StateError

STATE_FILE = "learner.safetensors"
_FORMAT = "sona-learner"
_VERSION = 1


def save_state(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` and ``meta`` to ``path`` atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = {"format": _FORMAT, "version": _VERSION, **meta}
    clean = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(clean, str(tmp), metadata={"sona": json.dumps(header, allow_nan=False)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """``(arrays, meta)`` from ``path``; None when there is no such file.

    Raises:
        StateError: the file is not a complete learner state (names the file).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {})["sona"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise StateError(f"cannot read learner state {path}: {type(e).__name__}: {e}") from e
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise StateError(
            f"{path} is not a {_FORMAT} v{_VERSION} state: format "
            f"{meta.get('format')!r} version {meta.get('version')!r}"
        )
    return arrays, meta


def remove_stale_temps(directory: Path) -> None:
    """Delete temp files of saves that a crash interrupted."""
    for p in Path(directory).glob(f".{STATE_FILE}.tmp-*"):
        p.unlink(missing_ok=True)
