"""Training checkpoints: a folder per step with the weights as safetensors and the rest of the training state
(optimizer, scheduler, grad scaler, RNG states, step, data position) as torch files of plain data, written
atomically and read as data only.

Layout: <dir>/step_00000100/{model.safetensors, trainer_state.pt, rng_rank<r>.pt} and <dir>/latest (a text
file naming the newest step folder). A folder is written under a temporary name and renamed into place, and
`latest` is replaced by os.replace, so a crash mid-write never leaves a half checkpoint that resume would pick.

Checkpoints are shared and downloaded, so loading one must never run code from it: the state files hold only
tensors, numbers, strings, and lists, tuples and dicts of them (save_state converts or refuses anything else)
and are read with torch.load(weights_only=True), which refuses pickled objects instead of running them. A state
file written by an earlier mmkern that holds other objects (e.g. a pathlib.Path in the saved config) is refused
with an error saying how to convert it; the conversion unpickles it, so run it only on a file you trust:

    python -c "import sys, torch; from mmkern.train.checkpoint import save_state; \\
               save_state(torch.load(sys.argv[1], weights_only=False), sys.argv[1])" FILE
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from mmkern._files import atomic_write
from mmkern.models.state_dict import load_torch_data, read_weights, save_weights

_STEP_DIR = re.compile(r"step_\d{8,}")  # the folders save_checkpoint writes
_CONVERT = (
    "If an earlier mmkern wrote this file and you trust it, convert it once with: "
    'python -c "import sys, torch; from mmkern.train.checkpoint import save_state; '
    'save_state(torch.load(sys.argv[1], weights_only=False), sys.argv[1])" {path}'
)


def plain_data(obj: Any, where: str = "state") -> Any:
    """obj as data torch.load(weights_only=True) reads back: tensors, None, bool, int, float, str, bytes, torch
    dtypes and devices, and lists, tuples and dicts of these. Paths become strings, dataclasses dicts, subclasses
    of the number and string types (numpy floats, IntEnums) their plain value; anything else is a ValueError
    naming where it sits, so a state that resume could not read is refused when it is saved, not when it is
    loaded."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device, bytes) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_data(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {plain_data(k, f"{where} key {k!r}"): plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    for base in (bool, int, float, str):  # bool first: it is an int
        if isinstance(obj, base):
            return base(obj)
    raise ValueError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data (tensors, numbers, strings, "
        "and lists, tuples and dicts of them); checkpoints hold data only"
    )


def save_state(state: Any, path: str | os.PathLike) -> None:
    """Writes plain_data(state) with torch.save, atomically."""
    data = plain_data(state)
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_state(path: str | os.PathLike) -> Any:
    """Reads a file written by save_state as data only: a pickled object in it is refused, never constructed or
    run. A missing file is FileNotFoundError; a refused, truncated or corrupted one a ValueError naming it."""
    return load_torch_data(path, _CONVERT.format(path=shlex.quote(str(path))))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    weights: dict[str, torch.Tensor] | None,
    state: dict | None,
    rank: int = 0,
    keep: int = 2,
    barrier=None,
) -> Path:
    """Writes step folder `step_<step>` under `directory`. Rank 0 writes weights and state (pass None on other
    ranks), every rank its RNG state; `barrier()` (distributed) separates the phases. Keeps the newest `keep`."""
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    save_state(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_weights(weights, tmp / "model.safetensors", {"step": str(step)})  # tied weights stored once
        save_state(state, tmp / "trainer_state.pt")
    if barrier:
        barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(directory / "latest", lambda p: Path(p).write_text(final.name))
        steps = sorted(p for p in directory.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The step folder `directory/latest` names, or None when there is no marker (nothing to resume). The marker
    may only name an existing step folder directly inside `directory`: resuming from anywhere else (`..`, an
    absolute path, a symlink out) because a marker file says so is a ValueError, as is an empty or torn marker."""
    directory = Path(directory)
    marker = directory / "latest"
    if not marker.exists():
        return None
    name = marker.read_text(errors="replace").strip()
    path = directory / name
    if not _STEP_DIR.fullmatch(name) or path.is_symlink() or not path.is_dir():
        raise ValueError(
            f"{marker}: names {name!r}, which is not an existing step folder (like step_00000100) directly inside "
            f"{directory}; to resume, write the name of one of its step folders into the marker"
        )
    return path


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> tuple[dict, dict, dict | None]:
    """-> (weights, trainer state, this rank's RNG state or None if it was saved with fewer ranks)."""
    path = Path(path)
    weights = read_weights(path / "model.safetensors")[0]
    state = load_state(path / "trainer_state.pt")
    rng_file = path / f"rng_rank{rank}.pt"
    rng = load_state(rng_file) if rng_file.exists() else None
    return weights, state, rng
