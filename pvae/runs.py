"""Run folders: one folder per trained model.

``config.json``
    everything that defines the run: the data (``dataset``, ``data_dir``, ``binarize``,
    ``seed``, sizes, ``condition``), the model (``model``, its registry name in
    :data:`pvae.models.MODELS` or :data:`pvae.autoencoders.AUTOENCODERS`, and
    ``model_config``, the model's recorded constructor arguments) and, under ``training``,
    what ``fit`` records (``loss`` and ``optim`` with their settings, batch size, seed,
    binarization, epochs); written when training starts (:class:`WriteConfig`).
``checkpoint.pt``
    the training state (:class:`pvae.train.TrainState`), its ``config`` the same record;
    a folder holds a run once this file exists.
``history.csv``, ``metrics.json``, ``report.json``, ``figures/``
    written by training and evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pvae import data, parallel
from pvae.autoencoders import AUTOENCODERS
from pvae.contract import resolve_device
from pvae.models import MODELS
from pvae.train import CHECKPOINT_NAME, Callback, CheckpointError, load_checkpoint, settings_diff

__all__ = ["CONFIG_NAME", "RunError", "WriteConfig", "build_model", "load_data", "load_run",
           "prepare_run", "read_config", "write_json"]

CONFIG_NAME = "config.json"
#: Every model a run folder can hold, by its ``"model"`` name.
REGISTRY = {**MODELS, **AUTOENCODERS}
#: Keys that every run's ``config.json`` holds.
REQUIRED_KEYS = ("dataset", "seed", "model", "model_config")


class RunError(ValueError):
    """A run folder cannot be created or continued as asked."""


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary file renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def prepare_run(out: str | os.PathLike, resume: bool = False, resumable: bool = True) -> Path:
    """Create (or, with ``resume``, check) the run folder ``out``. A folder holds a run once its
    checkpoint exists: a start that failed before the first checkpoint leaves nothing that
    blocks a corrected retry. ``config.json`` is written when training starts
    (:class:`WriteConfig`): the settings that ``fit`` records, the same as the checkpoint's;
    a resume with other settings is refused by ``fit`` against the checkpoint.

    :param bool resumable: whether the command can continue a run (``--resume``); only says
        what the error message suggests.
    :raises RunError: ``out`` is a file; it already holds a run and ``resume`` is false;
        ``resume`` without a run there.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; pass a folder for the run")
    holds_run = (out / CHECKPOINT_NAME).is_file()
    if holds_run and not resume:
        hint = "pass --resume to continue it or " if resumable else ""
        raise RunError(f"{out} already holds a run; {hint}choose another --out")
    if resume and not holds_run:
        raise RunError(f"--resume: {out} holds no run yet (no {CHECKPOINT_NAME}); drop --resume "
                       "to start one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out} cannot be created ({e.strerror})") from e
    return out


class WriteConfig(Callback):
    """Write the run's ``config.json`` when training starts (after a resume): the record that
    ``fit`` keeps in every checkpoint (the caller's settings, ``training`` with fit's own), so
    that the folder holds one settings record. Rank 0 writes it."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)

    def on_fit_start(self, state) -> None:
        if not state.distributed or parallel.rank() == 0:
            write_json(self.out / CONFIG_NAME, state.config)


def read_config(path: Path) -> dict:
    """A run's ``config.json``.

    :raises FileNotFoundError: no such file.
    :raises CheckpointError: not a JSON object with the keys every run has.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a folder written by "
                                "`pvae train --out ...`?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the run's "
                              "checkpoint or retrain") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (the run's settings), got a "
                              f"{type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {missing}; restore it or retrain")
    return config


def build_model(config: dict):
    """A fresh model of the run's architecture: ``REGISTRY[config["model"]]`` (a latent-variable
    model or an autoencoder) rebuilt from ``config["model_config"]``.

    :raises CheckpointError: unknown model name or a ``model_config`` it does not accept.
    """
    name = config.get("model")
    if name not in REGISTRY:
        raise CheckpointError(f"unknown model {name!r} in config.json; expected one of "
                              f"{sorted(REGISTRY)}")
    try:
        return REGISTRY[name].from_config(config["model_config"])
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
    config = read_config(config_path)
    device = resolve_device(device)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME, map_location=device)
    saved = state.get("config", {})
    mismatch = settings_diff({k: saved.get(k) for k in config}, config)
    if mismatch:
        raise CheckpointError(f"{run_dir / CHECKPOINT_NAME} was written for another config than "
                              f"{config_path} (checkpoint vs config: {mismatch}); retrain or "
                              "restore the matching config.json")
    _check_state(state, run_dir / CHECKPOINT_NAME)
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model in {config_path}: {e}") from e
    model.eval()
    return model, config, state


def _check_state(state: dict, path: Path) -> None:
    if not isinstance(state.get("epoch"), int):
        raise CheckpointError(f"{path} has no epoch count; it is not a complete pvae checkpoint")
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: its model state is a {type(state['model']).__name__}, "
                              "not a dict of tensors")
    bad = [k for k, v in state["model"].items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds NaN or inf weights ({', '.join(bad[:3])}); "
                              "use an earlier checkpoint or retrain")


def load_data(config: dict) -> data.Splits:
    """The run's dataset, loaded as its ``config`` says (name, folder, binarization, seed).

    :raises pvae.data.DataNotFoundError: the files are not found.
    """
    return data.load(config["dataset"], data_dir=config.get("data_dir"),
                     binarize=config.get("binarize"), seed=config["seed"],
                     download=config.get("download", False))
