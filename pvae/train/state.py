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


def settings_diff(before: dict, now: dict,
                  ignore=("training.num_epochs", "training.world_size")) -> dict:
    """``{key: (before, now)}`` for every setting that differs, nested dicts compared key by key
    under dotted names (``"training.loss.num_particles"``; a key missing on one side reads as
    ``None``), ``ignore`` left out: ``num_epochs`` may grow when a run is continued;
    ``world_size`` is checked on its own (:meth:`TrainState.restore`). The ``versions`` that
    wrote a record (:mod:`pvae.versions`) are never settings: only its ``format`` is compared."""
    before, now = _flat(before), _flat(now)
    keys = {k for k in (set(before) | set(now)) - set(ignore)
            if k != "versions" and not k.startswith("versions.")}
    return {k: (before.get(k), now.get(k)) for k in sorted(keys) if before.get(k) != now.get(k)}


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def seed_all(seed: int) -> None:
    """Seed torch (every device), Python's ``random`` and numpy, as ``pyro.set_rng_seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class TrainState:
    """Model, objective (with its own state: baselines, averages, param-store values),
    optimizer, learning-rate scheduler, the shuffling generator and every global RNG, epoch,
    history, the callbacks' states and the run's settings: one value with ``state_dict()``.

    :param model: the object being trained (its ``state_dict`` is saved when it is an
        ``nn.Module``).
    :param objective: an :class:`~pvae.train.Objective`.
    :param optimizer: a ``torch.optim`` optimizer over the trainable parameters.
    :param scheduler: its learning-rate scheduler (:class:`~pvae.train.optim.Scheduler`),
        stepped after every optimizer step or every epoch.
    :param generator: the CPU ``torch.Generator`` that shuffles the data.
    :param dict settings: what defines the run, ``{..., "training": {...}}`` (``fit`` records
        its own settings under ``"training"``); a checkpoint written with other settings is
        refused on resume (``training.num_epochs`` may differ).
    :param bool distributed: data-parallel training over the process group
        (:mod:`pvae.parallel`): the checkpoint then holds every rank's RNG states (each rank
        draws its own sampling noise), is written by rank 0 only and read by rank 0 and sent to
        the others; it resumes only with the same number of processes (``settings`` hold
        ``training.world_size``).
    :param callbacks: the run's :class:`~pvae.train.Callback` objects, whose own state is
        saved and restored with the rest.
    """

    def __init__(self, model, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, generator: torch.Generator, settings: dict,
                 distributed: bool = False, callbacks=()):
        self.distributed = distributed
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.scheduler, self.generator, self.settings = scheduler, generator, settings
        self.callbacks = list(callbacks)
        self.epoch, self.num_epochs, self.history = 0, 0, History()
        self.checkpoint: Path | None = None  # where the last good checkpoint is written

    @property
    def config(self) -> dict:
        """The settings with ``training.num_epochs``: what the checkpoint records."""
        training = {**self.settings.get("training", {}), "num_epochs": self.num_epochs}
        return {**self.settings, "training": training}

    def stop(self, reason: str) -> None:
        """End the run after the current epoch (a callback asks for it); ``reason`` is kept in
        the history (:attr:`History.stop_reason`, and the last row's ``stopped`` column) and
        the checkpoint, so that a resumed run knows it is finished."""
        self.history.stop_reason = str(reason)
        if self.history.rows:
            self.history.rows[-1]["stopped"] = str(reason)

    @property
    def stopped(self) -> bool:
        return self.history.stop_reason is not None

    def set_training(self, mode: bool) -> None:
        """``train()`` / ``eval()`` on the model and the objective."""
        if isinstance(self.model, nn.Module):
            self.model.train(mode)
        self.objective.train(mode)

    def _callback_keys(self) -> list[str]:
        seen: dict[str, int] = {}
        keys = []
        for cb in self.callbacks:
            name = type(cb).__name__
            keys.append(name if name not in seen else f"{name}.{seen[name]}")
            seen[name] = seen.get(name, 0) + 1
        return keys

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
            "stop_reason": self.history.stop_reason,
            "callbacks": {k: s for k, cb in zip(self._callback_keys(), self.callbacks)
                          if (s := cb.state_dict())},
            "config": self.config,
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
        self.history = History(state["history"], stop_reason=state.get("stop_reason"))
        self.epoch = state["epoch"]
        saved = state.get("callbacks", {})
        for key, cb in zip(self._callback_keys(), self.callbacks):
            if key in saved:
                cb.load_state_dict(saved[key])

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
        before = saved.get("training", {}).get("world_size", 1)
        now = self.settings.get("training", {}).get("world_size", 1)
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
