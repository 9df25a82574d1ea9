"""Atomic file writes: the one implementation behind every file mmkern writes for later reading (model and
training checkpoints, tokenizer vocabularies, training logs rewritten on resume)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls write(tmp) for a temporary path in path's folder, then renames it to path (os.replace, atomic on POSIX):
    a crash or an error mid-write leaves the old file, or none, never a torn one, and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
