"""Training checkpoints: a folder per step with the weights as safetensors and the rest of the training state
(optimizer, scheduler, grad scaler, RNG states, step, data position) as a torch file, written atomically.

Layout: <dir>/step_00000100/{model.safetensors, trainer_state.pt, rng_rank<r>.pt} and <dir>/latest (a text
file naming the newest step folder). A folder is written under a temporary name and renamed into place, and
`latest` is replaced by os.replace, so a crash mid-write never leaves a half checkpoint that resume would pick.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: str | os.PathLike, write) -> None:
    """Calls write(tmp_path), then renames tmp_path to path (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors file; every tensor is copied so tied weights (shared storage) are stored like any other."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


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
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_weights(weights, tmp / "model.safetensors", {"step": str(step)})
        torch.save(state, tmp / "trainer_state.pt")
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
    marker = Path(directory) / "latest"
    if not marker.exists():
        return None
    path = Path(directory) / marker.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> tuple[dict, dict, dict | None]:
    """-> (weights, trainer state, this rank's RNG state or None if it was saved with fewer ranks)."""
    path = Path(path)
    weights = load_weights(path / "model.safetensors")
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    return weights, state, rng
