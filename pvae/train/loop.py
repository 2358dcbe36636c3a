"""The training loop, blind to Pyro: an objective maps a mini-batch to ``(value, loss)``, the
loop differentiates the loss, steps the optimizer, records the value per epoch and hands each
epoch's row to the callbacks (:mod:`pvae.train.callbacks`: checkpoints, progress, logging,
early stopping)."""

from __future__ import annotations

import logging
import time

import torch

from pvae.parallel import all_reduce_sum
from pvae.train.callbacks import monitored
from pvae.train.data import TrainingData
from pvae.train.history import History
from pvae.train.state import TrainState
from pvae.train.steps import EagerStep

__all__ = ["mean_value", "run_epochs", "train_epoch"]

log = logging.getLogger("pvae")


def train_epoch(state: TrainState, data: TrainingData, step=None) -> dict:
    """One pass over ``data``; returns the epoch's history row (without validation).

    :param step: how a step runs (:class:`~pvae.train.steps.EagerStep` by default, or
        :class:`~pvae.train.steps.CapturedStep`).
    :raises TrainingDivergedError: the loss became NaN or inf.
    """
    step = EagerStep(state, data) if step is None else step
    name = state.objective.value_name
    state.set_training(True)
    t0, values, seen = time.perf_counter(), [], 0
    for i, batch in enumerate(data.shuffled(state.generator)):
        value, num_data = step(batch, state.epoch * data.steps_per_epoch + i)
        values.append(value * num_data)  # each step weighted by the datapoints it stands for
        seen += num_data
    step.check()
    seconds = time.perf_counter() - t0
    total = torch.stack(values).double().sum().item() if values else float("nan")
    if data.world_size > 1:  # every rank's datapoints
        total, seen = all_reduce_sum(total, seen)
    return {"epoch": state.epoch + 1, f"train_{name}": total / max(seen, 1),
            **state.objective.metrics(), f"val_{name}": float("nan"), "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("nan"),
            "lr": float(state.optimizer.param_groups[0]["lr"])}


@torch.no_grad()
def mean_value(objective, data: TrainingData, batch_size: int = 1000) -> float:
    """Mean over ``data`` of an objective's per-datapoint value (e.g. the validation ELBO), each
    batch weighted by the datapoints it stands for (``objective.num_data``); with several
    processes each computes its share and the sums are all-reduced."""
    total, count = 0.0, 0
    for batch in data.in_order(batch_size):
        total += objective(*batch)[0].item() * objective.num_data
        count += objective.num_data
    if data.world_size > 1:
        total, count = all_reduce_sum(total, count)
    return total / max(count, 1)


def run_epochs(state: TrainState, data: TrainingData, num_epochs: int, *,
               val_data: TrainingData | None = None, step=None) -> History:
    """Train from ``state.epoch`` up to ``num_epochs``: per epoch :func:`train_epoch` (with
    ``step``, see there), the validation value of ``state.objective.validation()`` on
    ``val_data``, a history row, and the callbacks' events (``state.callbacks``: see
    :mod:`pvae.train.callbacks`). A run that a callback stopped (also before a resume) trains
    no further."""
    state.num_epochs = num_epochs
    name = state.objective.value_name
    val_objective = state.objective.validation() if val_data is not None else None
    if state.stopped:
        log.warning("pvae: the run is finished (%s); nothing to train", state.history.stop_reason)
    for callback in state.callbacks:
        callback.on_fit_start(state)
    try:
        while state.epoch < num_epochs and not state.stopped:
            row = train_epoch(state, data, step)
            if val_data is not None:
                state.set_training(False)
                row[f"val_{name}"] = mean_value(val_objective, val_data)
            state.scheduler.step_epoch(monitored(state, row)[1])  # ReduceLROnPlateau's value
            state.history.rows.append(row)
            state.epoch += 1
            for callback in state.callbacks:
                callback.on_epoch_end(state, row)
    finally:
        for callback in state.callbacks:
            callback.on_fit_end(state)
    state.set_training(False)
    return state.history
