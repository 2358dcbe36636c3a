"""The training loop, blind to Pyro: an objective maps a mini-batch to ``(value, loss)``, the
loop differentiates the loss, steps the optimizer, records the value per epoch and writes a
checkpoint after every epoch."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pvae.train.checkpoint import save_checkpoint
from pvae.train.data import TrainingData
from pvae.train.history import History
from pvae.train.state import TrainState

__all__ = ["TrainingDivergedError", "mean_value", "run_epochs", "train_epoch"]


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _diverged(state: TrainState, loss, step: int, checkpoint: Path | None):
    where = (f"{checkpoint} (end of epoch {state.history[-1]['epoch']})"
             if checkpoint is not None and len(state.history) else "none was written")
    lr = state.optimizer.param_groups[0]["lr"]
    return TrainingDivergedError(
        f"the loss became {loss.item()} at epoch {state.epoch + 1}, step {step + 1}; last good "
        f"checkpoint: {where}. Lower the learning rate (lr={lr:g}) or check the data and the "
        "likelihood's scale")


def train_epoch(state: TrainState, data: TrainingData, bar=None,
                checkpoint: Path | None = None) -> dict:
    """One pass over ``data``; returns the epoch's history row (without validation).

    :raises TrainingDivergedError: the loss became NaN or inf (nothing is stepped then).
    """
    state.set_training(True)
    t0, values, seen = time.perf_counter(), [], 0
    for step, batch in enumerate(data.shuffled(state.generator)):
        state.objective.set_step(state.epoch * data.steps_per_epoch + step)
        value, loss = state.objective(*batch)
        if not torch.isfinite(loss):
            raise _diverged(state, loss, step, checkpoint)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        values.append(value * len(batch[0]))
        seen += len(batch[0])
        if bar is not None:
            bar.update()
            if step % 25 == 0:
                bar.set_postfix_str(f"epoch {state.epoch + 1} elbo {value.item():.2f}")
    seconds = time.perf_counter() - t0
    state.scheduler.step()
    total = torch.stack(values).double().sum().item() if values else float("nan")
    return {"epoch": state.epoch + 1, "train_elbo": total / max(seen, 1),
            **state.objective.metrics(), "val_elbo": float("nan"), "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("nan")}


@torch.no_grad()
def mean_value(objective, data: TrainingData, batch_size: int = 1000) -> float:
    """Mean over ``data`` of an objective's per-datapoint value (e.g. the validation ELBO)."""
    total = 0.0
    for batch in data.in_order(batch_size):
        total += objective(*batch)[0].item() * len(batch[0])
    return total / len(data)


def run_epochs(state: TrainState, data: TrainingData, num_epochs: int, *,
               val_objective=None, val_data: TrainingData | None = None,
               checkpoint: Path | None = None, progress: bool = True) -> History:
    """Train from ``state.epoch`` up to ``num_epochs``: per epoch :func:`train_epoch`, the
    validation value, a history row and (with ``checkpoint``) an atomic checkpoint."""
    state.num_epochs = num_epochs
    bar = tqdm(total=max(num_epochs - state.epoch, 0) * data.steps_per_epoch,
               disable=not progress, desc="fit", unit="batch", dynamic_ncols=True)
    try:
        while state.epoch < num_epochs:
            row = train_epoch(state, data, bar if progress else None, checkpoint)
            if val_data is not None:
                state.set_training(False)
                row["val_elbo"] = mean_value(val_objective, val_data)
            state.history.rows.append(row)
            state.epoch += 1
            if checkpoint is not None:
                save_checkpoint(checkpoint, state.state_dict())
    finally:
        bar.close()
    state.set_training(False)
    return state.history
