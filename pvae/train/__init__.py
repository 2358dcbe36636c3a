"""The training engine: training data, the state of a run, the loop and its callbacks,
checkpoints and the optimizer, assembled by :func:`fit`. The loop itself is blind to Pyro: an
objective (:class:`Objective`) maps a mini-batch to ``(value, loss)``."""

from pvae.contract import resolve_device
from pvae.train.callbacks import (
    BestCheckpoint,
    Callback,
    Checkpoint,
    EarlyStopping,
    HistoryCSV,
    ProgressBar,
    monitored,
)
from pvae.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pvae.train.data import TrainingData
from pvae.train.fit import fit
from pvae.train.history import History
from pvae.train.loop import mean_value, run_epochs, train_epoch
from pvae.train.objective import HasDefaultLoss, Loss, Objective, bind_objective
from pvae.train.optim import (
    SCHEDULES,
    Adam,
    AdamW,
    ConstantLR,
    CosineLR,
    ExponentialLR,
    ReduceLROnPlateau,
    Scheduler,
    StepLR,
    make_adam,
)
from pvae.train.state import TrainState, seed_all, settings_diff
from pvae.train.steps import STEPS, CapturedStep, CUDAGraph, EagerStep, TrainingDivergedError

__all__ = [
    "CHECKPOINT_NAME",
    "SCHEDULES",
    "STEPS",
    "Adam",
    "AdamW",
    "BestCheckpoint",
    "ConstantLR",
    "CosineLR",
    "EarlyStopping",
    "ReduceLROnPlateau",
    "Scheduler",
    "StepLR",
    "CUDAGraph",
    "Callback",
    "CapturedStep",
    "Checkpoint",
    "CheckpointError",
    "EagerStep",
    "ExponentialLR",
    "HasDefaultLoss",
    "History",
    "HistoryCSV",
    "Loss",
    "Objective",
    "ProgressBar",
    "TrainState",
    "TrainingData",
    "TrainingDivergedError",
    "bind_objective",
    "fit",
    "get_rng_state",
    "load_checkpoint",
    "make_adam",
    "mean_value",
    "monitored",
    "resolve_device",
    "run_epochs",
    "save_checkpoint",
    "seed_all",
    "set_rng_state",
    "settings_diff",
    "train_epoch",
]
