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

from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["Callback", "Checkpoint", "ProgressBar"]


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
