"""Callbacks: code that acts on the training loop's epoch-level events (Lightning's
``Callback``: ``on_train_epoch_end``, ``on_fit_end``), so that logging, checkpoints, early
stopping and the progress bar are added without editing the loop.

The events, in order (:func:`pvae.train.run_epochs`):

- ``on_fit_start(state)``: once, after a resume has restored the state (``state.epoch`` is the
  number of epochs done);
- ``on_epoch_end(state, row)``: after every epoch, with the epoch's history row (validation
  included) already appended to ``state.history``; a callback may end the run after this epoch
  with ``state.stop(reason)`` (the reason is kept in the history and the checkpoint);
- ``on_fit_end(state)``: once, when the loop ends, also when it stops early or with an error.

A resumed run fires ``on_epoch_end`` once per remaining epoch. Nothing fires inside an epoch,
so a step captured as a CUDA graph never waits for the host. Callbacks run in the order given,
before the loop's own (the checkpoint, then the progress bar), so that a checkpoint holds what
they did at that epoch; with a ``state_dict()`` of their own, that is saved in the checkpoint
and restored on resume. Under data-parallel training every process runs them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tqdm.auto import tqdm

from pvae.validation import check_count, check_float

__all__ = ["BestCheckpoint", "Callback", "Checkpoint", "EarlyStopping", "HistoryCSV",
           "ProgressBar", "monitored"]

log = logging.getLogger("pvae")


class Callback:
    """Base class: every event does nothing; override the ones you need.

    Example, a logger of the validation ELBO that also stops a run that got worse::

        class PrintAndStop(Callback):
            def on_epoch_end(self, state, row):
                print(row["epoch"], row["val_elbo"])
                if len(state.history) > 1 and row["val_elbo"] < state.history[-2]["val_elbo"]:
                    state.stop("the validation ELBO fell")
    """

    def on_fit_start(self, state) -> None:
        """The loop starts (after a resume)."""

    def on_epoch_end(self, state, row: dict) -> None:
        """An epoch ended; ``row`` is its history row."""

    def on_fit_end(self, state) -> None:
        """The loop ended (normally, stopped, or by an error)."""

    def state_dict(self) -> dict:
        """What a resume needs of this callback (saved in the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class Checkpoint(Callback):
    """The loop's own checkpoint: :meth:`TrainState.save` to ``path`` atomically after every
    epoch (a collective call under data-parallel training; rank 0 writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_epoch_end(self, state, row: dict) -> None:
        state.save(self.path)


class ProgressBar(Callback):
    """A tqdm bar over the epochs, with the last epoch's training and validation values."""

    def __init__(self):
        self.bar = None

    def on_fit_start(self, state) -> None:
        self.bar = tqdm(total=state.num_epochs, initial=min(state.epoch, state.num_epochs),
                        desc="fit", unit="epoch", dynamic_ncols=True)

    def on_epoch_end(self, state, row: dict) -> None:
        if self.bar is None:
            return
        name = state.objective.value_name
        self.bar.update()
        self.bar.set_postfix_str(f"train {name} {row[f'train_{name}']:.2f}, "
                                 f"val {row[f'val_{name}']:.2f}")

    def on_fit_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class HistoryCSV(Callback):
    """Rewrite ``history.csv`` at ``path`` atomically after every epoch (and at the start of a
    resumed run), so that a run can be watched while it trains (``tail -F``, which follows the
    file's name through the atomic renames)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_fit_start(self, state) -> None:
        if len(state.history) and _writes(state):
            state.history.to_csv(self.path)

    def on_epoch_end(self, state, row: dict) -> None:
        if _writes(state):
            state.history.to_csv(self.path)


def _writes(state) -> bool:
    """Rank 0 writes (every rank runs the callbacks under data-parallel training)."""
    if not state.distributed:
        return True
    from pvae import parallel

    return parallel.rank() == 0


def monitored(state, row: dict) -> tuple[str, float]:
    """``(column, score)``: the value early stopping and the best checkpoint watch, the
    validation value when the run has one (else the training value), as a score where higher is
    better (an ELBO as it is, a loss negated)."""
    name = state.objective.value_name
    column = f"val_{name}" if not math.isnan(row.get(f"val_{name}", math.nan)) else \
        f"train_{name}"
    value = float(row[column])
    return column, value if name != "loss" else -value


class _Best(Callback):
    """The best monitored score so far, counted only once the objective is settled (beta no
    longer warming up or cycling: scores under another beta are not comparable)."""

    def __init__(self, min_delta: float = 0.0):
        self.min_delta = check_float("min_delta", min_delta, minimum=0.0)
        self.best, self.best_epoch = None, None

    def improved(self, state, row: dict) -> bool | None:
        """Whether the epoch's score beats the best by more than ``min_delta`` (and record it);
        ``None`` while the objective is not settled."""
        if not state.objective.settled():
            return None
        _, score = monitored(state, row)
        if self.best is None or score > self.best + self.min_delta:
            self.best, self.best_epoch = score, row["epoch"]
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EarlyStopping(_Best):
    """Stop the run when the monitored value (the validation ELBO, or loss for an autoencoder;
    the training value without validation data) has not improved by more than ``min_delta``
    for ``patience`` epochs in a row. Paused while the objective is not settled (beta warming
    up or in the rising part of a cycle): those epochs neither count nor set the best. It says
    why in one logged line, and the reason is kept in the history and the checkpoint (a resumed
    run is then finished).

    :param int patience: epochs without improvement before stopping, >= 1.
    :param float min_delta: the smallest improvement that counts (nats per datapoint, or loss
        units), >= 0.
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.0):
        super().__init__(min_delta)
        self.patience = check_count("patience", patience)
        self.bad_epochs = 0

    def on_epoch_end(self, state, row: dict) -> None:
        improved = self.improved(state, row)
        if improved is None:
            return
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self.bad_epochs >= self.patience:
            column, _ = monitored(state, row)
            best = self.best if state.objective.value_name != "loss" else -self.best
            reason = (f"early stopping after epoch {row['epoch']}: {column} has not improved by "
                      f"more than {self.min_delta:g} for {self.patience} epochs (best "
                      f"{best:.4f} at epoch {self.best_epoch})")
            if _writes(state):
                log.warning("pvae: %s", reason)
            state.stop(reason)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bad_epochs = state["bad_epochs"]


class BestCheckpoint(_Best):
    """Keep the state of the best epoch so far (the monitored value, as for
    :class:`EarlyStopping`) at ``path`` (``best.pt`` beside ``checkpoint.pt``), written
    atomically and only when the value improves by more than ``min_delta`` (once the objective
    is settled).

    :param path: the file.
    :param float min_delta: the smallest improvement that counts.
    """

    def __init__(self, path: str | Path, min_delta: float = 0.0):
        super().__init__(min_delta)
        self.path = Path(path)

    def on_epoch_end(self, state, row: dict) -> None:
        if self.improved(state, row):
            state.save(self.path)
