"""The whole state of a training run in one value, with ``state_dict()`` /
``load_state_dict()``: what a checkpoint holds and a resumed run restores."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pvae import parallel
from pvae.train.checkpoint import (
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pvae.train.history import History

__all__ = ["TrainState", "seed_all", "settings_diff"]


def settings_diff(before: dict, now: dict, ignore=("num_epochs", "world_size")) -> dict:
    """``{key: (before, now)}`` for every setting that differs (a key missing on one side reads
    as ``None``), ``ignore`` left out: ``num_epochs`` may grow when a run is continued;
    ``world_size`` is checked on its own (:meth:`TrainState.restore`)."""
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
    :param bool distributed: data-parallel training over the process group
        (:mod:`pvae.parallel`): the checkpoint then holds every rank's RNG states (each rank
        draws its own sampling noise), is written by rank 0 only and read by rank 0 and sent to
        the others; it resumes only with the same number of processes (``settings`` hold
        ``world_size``).
    """

    def __init__(self, model, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_decay: float, generator: torch.Generator, settings: dict,
                 distributed: bool = False):
        self.distributed = distributed
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
        """Everything a resume needs; with ``distributed`` a collective call (every rank's RNG
        states are gathered into ``rng_ranks``)."""
        state = {
            "model": self.model.state_dict() if isinstance(self.model, nn.Module) else {},
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "rng": get_rng_state(self.generator),
            "history": self.history.rows,
            "config": {**self.settings, "num_epochs": self.num_epochs},
        }
        if self.distributed:
            state["rng_ranks"] = parallel.all_gather(state["rng"])
        return state

    def save(self, path: Path) -> None:
        """Write :meth:`state_dict` atomically to ``path`` (rank 0 only when distributed)."""
        state = self.state_dict()
        if not self.distributed or parallel.rank() == 0:
            save_checkpoint(path, state)

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.model, nn.Module):
            self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng_ranks"][parallel.rank()] if self.distributed else state["rng"]
        set_rng_state(rng, self.generator)
        self.history = History(state["history"])
        self.epoch = state["epoch"]

    def resume(self, path: Path, map_location=None) -> bool:
        """Continue from the checkpoint at ``path`` if there is one; returns whether there was.
        With ``distributed``, rank 0 reads it and sends it to the other ranks.

        :raises CheckpointError: it was written with other settings or another number of
            processes, or by a pvae whose checkpoints lack the objective's state.
        """
        if not self.distributed:
            if not path.is_file():
                return False
            state = load_checkpoint(path, map_location=map_location)
        else:
            state = parallel.main_only(
                lambda: load_checkpoint(path, map_location="cpu") if path.is_file() else None)
            if state is None:
                return False
        self.restore(state, path)
        return True

    def restore(self, state: dict, path: Path) -> None:
        """:meth:`load_state_dict` after checking that the checkpoint ``state`` (read from
        ``path``) belongs to this run.

        :raises CheckpointError: see :meth:`resume`.
        """
        saved = state.get("config", {})
        before, now = saved.get("world_size", 1), self.settings.get("world_size", 1)
        if before != now:
            raise CheckpointError(
                f"{path} was written by {before} process(es), this run has {now}: the shuffled "
                f"batches, their split over processes and each process's random draws depend on "
                f"the number of processes, so resume with {before} (torchrun --nproc_per_node "
                f"{before}{'' if before > 1 else ', or without torchrun'}), or train into a new "
                "folder")
        diff = settings_diff(saved, self.settings)
        if diff:
            raise CheckpointError(f"{path} was written with another configuration "
                                  f"(saved vs now: {diff}); use a new checkpoint_dir or the "
                                  "same settings")
        if "objective" not in state:
            raise CheckpointError(f"{path} was written by an older pvae without the objective's "
                                  "state; it cannot be resumed exactly: train into a new folder")
        self.load_state_dict(state)
