"""The training loop, blind to Pyro: an objective maps a mini-batch to ``(value, loss)``, the
loop differentiates the loss, steps the optimizer, records the value per epoch and writes a
checkpoint after every epoch."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pvae.parallel import all_reduce_sum
from pvae.train.data import TrainingData
from pvae.train.history import History
from pvae.train.state import TrainState
from pvae.train.steps import EagerStep

__all__ = ["mean_value", "run_epochs", "train_epoch", "value_name"]


def train_epoch(state: TrainState, data: TrainingData, step=None, bar=None) -> dict:
    """One pass over ``data``; returns the epoch's history row (without validation).

    :param step: how a step runs (:class:`~pvae.train.steps.EagerStep` by default, or
        :class:`~pvae.train.steps.CapturedStep`).
    :raises TrainingDivergedError: the loss became NaN or inf.
    """
    step = EagerStep(state, data) if step is None else step
    name = value_name(state.objective)
    state.set_training(True)
    t0, values, seen = time.perf_counter(), [], 0
    for i, batch in enumerate(data.shuffled(state.generator)):
        value = step(batch, state.epoch * data.steps_per_epoch + i)
        values.append(value * len(batch[0]))
        seen += len(batch[0])
        if bar is not None:
            bar.update()
            if i % 25 == 0:
                bar.set_postfix_str(f"epoch {state.epoch + 1} {name} {value.item():.2f}")
    step.check()
    seconds = time.perf_counter() - t0
    state.scheduler.step()
    total = torch.stack(values).double().sum().item() if values else float("nan")
    if data.world_size > 1:  # every rank's datapoints
        total, seen = all_reduce_sum(total, seen)
    return {"epoch": state.epoch + 1, f"train_{name}": total / max(seen, 1),
            **state.objective.metrics(), f"val_{name}": float("nan"), "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("nan")}


def value_name(objective) -> str:
    """What an objective's value is called in the history (``train_<name>``,
    ``val_<name>``): its ``value_name``, ``"elbo"`` by default."""
    return getattr(objective, "value_name", "elbo")


@torch.no_grad()
def mean_value(objective, data: TrainingData, batch_size: int = 1000) -> float:
    """Mean over ``data`` of an objective's per-datapoint value (e.g. the validation ELBO);
    with several processes each computes its share and the sums are all-reduced."""
    total = 0.0
    for batch in data.in_order(batch_size):
        total += objective(*batch)[0].item() * len(batch[0])
    if data.world_size > 1:
        (total,) = all_reduce_sum(total)
    return total / len(data)


def run_epochs(state: TrainState, data: TrainingData, num_epochs: int, *,
               val_objective=None, val_data: TrainingData | None = None,
               checkpoint: Path | None = None, progress: bool = True, step=None) -> History:
    """Train from ``state.epoch`` up to ``num_epochs``: per epoch :func:`train_epoch` (with
    ``step``, see there), the validation value, a history row and (with ``checkpoint``) an
    atomic checkpoint."""
    state.num_epochs, state.checkpoint = num_epochs, checkpoint
    bar = tqdm(total=max(num_epochs - state.epoch, 0) * data.steps_per_epoch,
               disable=not progress, desc="fit", unit="batch", dynamic_ncols=True)
    try:
        while state.epoch < num_epochs:
            row = train_epoch(state, data, step, bar if progress else None)
            if val_data is not None:
                state.set_training(False)
                row[f"val_{value_name(state.objective)}"] = mean_value(val_objective, val_data)
            state.history.rows.append(row)
            state.epoch += 1
            if checkpoint is not None:
                state.save(checkpoint)
    finally:
        bar.close()
    state.set_training(False)
    return state.history
