"""The whole state of a training run in one value, with ``state_dict()`` /
``load_state_dict()``: what a checkpoint holds and a resumed run restores."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pvae.train.checkpoint import CheckpointError, get_rng_state, load_checkpoint, set_rng_state
from pvae.train.history import History

__all__ = ["TrainState", "seed_all", "settings_diff"]


def settings_diff(before: dict, now: dict, ignore=("num_epochs",)) -> dict:
    """``{key: (before, now)}`` for every setting that differs (a key missing on one side reads
    as ``None``), ``ignore`` left out: ``num_epochs`` may grow when a run is continued."""
    keys = (set(before) | set(now)) - set(ignore)
    return {k: (before.get(k), now.get(k)) for k in sorted(keys) if before.get(k) != now.get(k)}


def seed_all(seed: int) -> None:
    """Seed torch (every device), Python's ``random`` and numpy, as ``pyro.set_rng_seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class TrainState:
    """Model, objective (with its own state: baselines, averages, param-store values),
    optimizer, learning-rate schedule, the shuffling generator and every global RNG, epoch,
    history and the run's settings.

    :param model: the object being trained (its ``state_dict`` is saved when it is an
        ``nn.Module``).
    :param objective: an ``nn.Module`` whose ``forward(*batch)`` returns ``(value, loss)``.
    :param optimizer: a ``torch.optim`` optimizer over the trainable parameters.
    :param float lr_decay: per-epoch factor of ``ExponentialLR``.
    :param generator: the CPU ``torch.Generator`` that shuffles the data.
    :param dict settings: what defines the run; a checkpoint written with other settings is
        refused on resume (``num_epochs`` may differ).
    """

    def __init__(self, model, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_decay: float, generator: torch.Generator, settings: dict):
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
        self.generator, self.settings = generator, settings
        self.epoch, self.num_epochs, self.history = 0, 0, History()
        self.checkpoint: Path | None = None  # where run_epochs writes it

    def set_training(self, mode: bool) -> None:
        """``train()`` / ``eval()`` on the model and the objective."""
        if isinstance(self.model, nn.Module):
            self.model.train(mode)
        self.objective.train(mode)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict() if isinstance(self.model, nn.Module) else {},
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "rng": get_rng_state(self.generator),
            "history": self.history.rows,
            "config": {**self.settings, "num_epochs": self.num_epochs},
        }

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.model, nn.Module):
            self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generator)
        self.history = History(state["history"])
        self.epoch = state["epoch"]

    def resume(self, path: Path, map_location=None) -> None:
        """Continue from the checkpoint at ``path``.

        :raises CheckpointError: it was written with other settings, or by a pvae whose
            checkpoints lack the objective's state.
        """
        state = load_checkpoint(path, map_location=map_location)
        diff = settings_diff(state.get("config", {}), self.settings)
        if diff:
            raise CheckpointError(f"{path} was written with another configuration "
                                  f"(saved vs now: {diff}); use a new checkpoint_dir or the "
                                  "same settings")
        if "objective" not in state:
            raise CheckpointError(f"{path} was written by an older pvae without the objective's "
                                  "state; it cannot be resumed exactly: train into a new folder")
        self.load_state_dict(state)
