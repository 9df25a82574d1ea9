"""The optional dependencies of the trainer, the demo and the embedded datasets (tqdm, matplotlib, scikit-learn),
installed with the `train` extra so that the kernels and models install without them."""

from __future__ import annotations

import importlib
from types import ModuleType

TRAIN_PACKAGES = {"tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


class MissingExtra(ImportError):
    """A package of the `train` extra is not installed; the message says how to install it."""


def train_module(name: str) -> ModuleType:
    """importlib.import_module(name) for a module of the train extra's packages, or MissingExtra naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        package = TRAIN_PACKAGES.get(name.split(".")[0], name.split(".")[0])
        raise MissingExtra(
            f"{package} is not installed; training, the demo and the embedded datasets need mmkern's train extra: "
            "pip install 'mmkern[train]' (from a source checkout: pip install -e '.[train]')"
        ) from e


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    train_module("matplotlib").use("Agg")
    return train_module("matplotlib.pyplot")
