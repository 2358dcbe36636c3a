"""Run folders: one folder per trained model.

``config.json``
    everything that defines the run: the data (``dataset``, ``data_dir``, ``binarize``,
    ``seed``, sizes, ``condition``), the model (``model``, its registry name in
    :data:`pvae.models.MODELS`, and ``model_config``, the model's recorded constructor
    arguments) and the training settings.
``checkpoint.pt``
    the training state (:class:`pvae.train.TrainState`), its ``config`` a copy of the above;
    a folder holds a run once this file exists.
``history.csv``, ``metrics.json``, ``report.json``, ``figures/``
    written by training and evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pvae import data
from pvae.contract import resolve_device
from pvae.models import MODELS
from pvae.train import CHECKPOINT_NAME, CheckpointError, load_checkpoint, settings_diff

__all__ = ["CONFIG_NAME", "RunError", "build_model", "load_data", "load_run", "prepare_run",
           "write_json"]

CONFIG_NAME = "config.json"


class RunError(ValueError):
    """A run folder cannot be created or continued as asked."""


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary file renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def prepare_run(out: str | os.PathLike, config: dict, resume: bool = False,
                resumable: bool = True) -> Path:
    """Create (or, with ``resume``, check) the run folder ``out`` for ``config`` and write its
    ``config.json``.

    :param bool resumable: whether the command can continue a run (``--resume``); only says
        what the error message suggests.
    :raises RunError: ``out`` already holds a run and ``resume`` is false, or ``resume`` with
        settings other than the folder's (``num_epochs`` may change).
    """
    out = Path(out)
    config_path = out / CONFIG_NAME
    if config_path.is_file() and not resume:
        hint = "pass --resume to continue it or " if resumable else ""
        raise RunError(f"{out} already holds a run; {hint}choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if resume and config_path.is_file():
        diff = settings_diff(json.loads(config_path.read_text()), config)
        if diff:
            raise RunError(f"--resume with other settings than {config_path} (before vs now: "
                           f"{diff})")
    write_json(config_path, config)
    return out


def build_model(config: dict):
    """A fresh model of the run's architecture: ``MODELS[config["model"]]`` rebuilt from
    ``config["model_config"]``.

    :raises CheckpointError: unknown model name or a ``model_config`` it does not accept.
    """
    name = config.get("model")
    if name not in MODELS:
        raise CheckpointError(f"unknown model {name!r} in config.json; expected one of "
                              f"{sorted(MODELS)}")
    try:
        return MODELS[name].from_config(config["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json cannot rebuild the {name} model ({e})") from e


def load_run(run_dir, device="auto"):
    """Load a trained run: ``(model, config, checkpoint_state)``, the model in eval mode.

    :param device: where to put the model (``"auto"``: CUDA when available).
    :raises FileNotFoundError: no ``config.json`` or ``checkpoint.pt`` in ``run_dir``.
    :raises CheckpointError: ``config.json`` is not valid JSON, the checkpoint is corrupt, or
        it was written for other settings than ``config.json`` holds.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a folder written by "
                                "`pvae train --out ...`?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from e
    device = resolve_device(device)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME, map_location=device)
    saved = state.get("config", {})
    mismatch = settings_diff({k: saved.get(k) for k in config}, config)
    if mismatch:
        raise CheckpointError(f"{run_dir / CHECKPOINT_NAME} was written for another config than "
                              f"{config_path} (checkpoint vs config: {mismatch}); retrain or "
                              "restore the matching config.json")
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model in {config_path}: {e}") from e
    model.eval()
    return model, config, state


def load_data(config: dict) -> data.Splits:
    """The run's dataset, loaded as its ``config`` says (name, folder, binarization, seed).

    :raises pvae.data.DataNotFoundError: the files are not found.
    """
    return data.load(config["dataset"], data_dir=config.get("data_dir"),
                     binarize=config.get("binarize"), seed=config["seed"],
                     download=config.get("download", False))
