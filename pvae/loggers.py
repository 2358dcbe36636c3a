"""Loggers of a training run, as callbacks (:class:`pvae.train.Callback`): every epoch's history
row as scalars, and at the end the training-curve figure, to TensorBoard
(``torch.utils.tensorboard``) or to an MLflow tracking store. Both are optional extras of the
package (``pip install "pvae-ppl[tensorboard]"`` / ``"pvae-ppl[mlflow]"``); the loggers import
them when the run starts and say how to install them if they are missing.

Under data-parallel training only rank 0 logs. A logger's files are written by its library
(event files are appended as the run goes), not through :mod:`pvae.files`.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from pvae import parallel, plots
from pvae.train import Callback

__all__ = ["LOGGERS", "MLflowLogger", "TensorBoardLogger", "scalars"]


def scalars(row: dict) -> dict[str, float]:
    """The finite numeric columns of a history row (``epoch`` left out: it is the step)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and not isinstance(v, bool)
            and isinstance(v, numbers.Real) and math.isfinite(v)}


def _missing(package: str, extra: str) -> ImportError:
    return ImportError(f"this logger needs the {package} package: pip install "
                       f"'pvae-ppl[{extra}]' (or pip install {package})")


def _main(state) -> bool:
    return not state.distributed or parallel.rank() == 0


class TensorBoardLogger(Callback):
    """The history's scalars after every epoch (step = epoch) and the training curve at the
    end, as TensorBoard event files in ``log_dir`` (``tensorboard --logdir log_dir``).

    :param log_dir: the folder of the event files (``RUN/tensorboard`` for ``pvae train
        --logger tensorboard``).
    :raises ImportError: (when the run starts) TensorBoard is not installed.
    """

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_fit_start(self, state) -> None:
        if not _main(state):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", "tensorboard") from e
        self.writer = SummaryWriter(str(self.log_dir))

    def on_epoch_end(self, state, row: dict) -> None:
        if self.writer is None:
            return
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, state) -> None:
        if self.writer is None:
            return
        if len(state.history):
            self.writer.add_figure("training_curve", plots.training_curve(state.history),
                                   state.history[-1]["epoch"])
        self.writer.close()
        self.writer = None


class MLflowLogger(Callback):
    """The run's settings as parameters, the history's scalars after every epoch (step =
    epoch) and the training curve at the end, in an MLflow tracking store: a local folder by
    default (``mlflow ui --backend-store-uri file:FOLDER``; MLflow 3 keeps its file store in
    maintenance, so the logger sets ``MLFLOW_ALLOW_FILE_STORE=true`` for a ``file:`` URI
    unless it is set already).

    :param tracking_uri: e.g. ``file:RUN/mlruns`` (a local file store) or a server's URL.
    :param str experiment: the experiment's name.
    :param run_name: the MLflow run's name.
    :raises ImportError: (when the run starts) MLflow is not installed.
    """

    def __init__(self, tracking_uri: str, experiment: str = "pvae", run_name: str | None = None):
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.client = self.run_id = None

    def on_fit_start(self, state) -> None:
        if not _main(state):
            return
        if self.tracking_uri.startswith("file:"):  # MLflow 3 asks to opt in to its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("mlflow", "mlflow") from e
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(self.experiment))
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        for key, value in _flat(state.config).items():
            self.client.log_param(self.run_id, key, value)

    def on_epoch_end(self, state, row: dict) -> None:
        if self.client is None:
            return
        for name, value in scalars(row).items():
            self.client.log_metric(self.run_id, name, value, step=row["epoch"])

    def on_fit_end(self, state) -> None:
        if self.client is None:
            return
        if len(state.history):
            self.client.log_figure(self.run_id, plots.training_curve(state.history),
                                   "training_curve.png")
        self.client.set_terminated(self.run_id)
        self.client = None


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: Loggers by name (``pvae train --logger NAME``): each makes the callback for a run folder.
LOGGERS = {
    "tensorboard": lambda run: TensorBoardLogger(Path(run) / "tensorboard"),
    "mlflow": lambda run: MLflowLogger(f"file:{Path(run).resolve() / 'mlruns'}",
                                       run_name=Path(run).name),
}
