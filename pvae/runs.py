"""Run folders: one folder per trained model.

``config.json``
    everything that defines the run: the data (``dataset``, ``data_dir``, ``binarize``,
    ``seed``, sizes, ``condition``), the model (``model``, its registry name in
    :data:`pvae.models.MODELS` or :data:`pvae.autoencoders.AUTOENCODERS`, and
    ``model_config``, the model's recorded constructor arguments) and, under ``training``,
    what ``fit`` records (``loss`` and ``optim`` with their settings, batch size, seed,
    binarization, epochs); written when training starts (:class:`WriteConfig`).
    It also records the run ``format`` and the pvae, torch and Pyro ``versions`` that wrote it
    (:mod:`pvae.versions`; :func:`run_record`), and for your own data (``--data-file``,
    ``--image-folder``) the path, its options and ``data_sha256``, the digest of the data read.
``checkpoint.pt``
    the training state (:class:`pvae.train.TrainState`), its ``config`` the same record;
    a folder holds a run once this file exists.
``best.pt``
    the state of the epoch with the best validation value (:data:`BEST_NAME`), kept where the
    run has validation data; ``load_run(..., checkpoint="best")`` loads it.
``history.csv``, ``metrics.json``, ``report.json``, ``figures/``
    written by training and evaluation.

Every file is written atomically and never through a link (:mod:`pvae.files`); one process
writes a run at a time (:func:`lock_run`, a lock on ``.lock`` in the folder). A run folder
received from elsewhere is data, never instructions: :func:`load_run` refuses links that leave
the folder, bounds ``config.json`` (size and nesting) and checks the model that it describes
against the checkpoint's tensor shapes before building it, and evaluation
(:func:`load_data` with ``received=True``) never downloads, uses ``data_dir`` and the paths of
your own data only if they exist, and refuses data whose digest differs from the one
recorded. A run of another format is refused with the version that wrote it. The checkpoint
alone rebuilds ``config.json`` and ``history.csv`` (:func:`repair_run`,
``pvae repair RUN``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import torch

from pvae import data, files, parallel
from pvae.autoencoders import AUTOENCODERS
from pvae.contract import resolve_device
from pvae.models import MODELS
from pvae.train import (
    CHECKPOINT_NAME,
    Callback,
    CheckpointError,
    History,
    load_checkpoint,
    settings_diff,
)
from pvae.versions import FORMAT, check_format, versions

__all__ = ["BEST_NAME", "CHECKPOINTS", "CONFIG_NAME", "RunError", "WriteConfig",
           "available_memory", "build_model", "check_out", "load_data", "load_run", "lock_run",
           "new_model", "prepare_run", "read_config", "repair_run", "run_record", "stop_reason",
           "write_json"]

CONFIG_NAME = "config.json"
#: The best epoch's state, beside ``checkpoint.pt`` (the last).
BEST_NAME = "best.pt"
#: The checkpoints a run folder may hold, by the name ``pvae evaluate --checkpoint`` takes.
CHECKPOINTS = {"last": CHECKPOINT_NAME, "best": BEST_NAME}
#: The options of your own data that are paths (used in a received run only if they exist).
PATH_OPTIONS = ("data_file", "image_folder")
#: Every model a run folder can hold, by its ``"model"`` name.
REGISTRY = {**MODELS, **AUTOENCODERS}
#: Keys that every run's ``config.json`` holds.
REQUIRED_KEYS = ("dataset", "seed", "model", "model_config")
HISTORY_NAME = "history.csv"
#: The largest ``config.json`` read (a run's is a few kB) and its deepest nesting.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
#: Memory that training needs per byte of parameters: the weights, their gradients and Adam's
#: two moments.
TRAINING_MEMORY_FACTOR = 4


class RunError(ValueError):
    """A run folder cannot be created or continued as asked."""


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`pvae.files.write_json`: a
    fresh temporary file renamed into place, never through a link).

    :raises pvae.files.WriteError: the file cannot be written.
    """
    files.write_json(path, obj)


def check_out(out, option: str = "--out") -> Path:
    """``out`` as a run folder's path: not empty (an unset shell variable), not a file, and a
    path that this system can create.

    :raises RunError: saying which, and naming ``option``.
    """
    if out is None or not str(out).strip():
        raise RunError(f"{option} is empty (an unset shell variable?); pass a folder for the run, "
                       "e.g. runs/NAME")
    out = Path(out)
    try:
        info = os.stat(out)
    except FileNotFoundError:
        return out
    except NotADirectoryError as e:
        raise RunError(f"{option} {_short(out)} cannot be created (a part of its path is a "
                       "file)") from e
    except OSError as e:  # e.g. a name longer than the file system allows
        raise RunError(f"{option} {_short(out)} cannot be used ({e.strerror})") from e
    if not stat.S_ISDIR(info.st_mode):
        raise RunError(f"{option} {out} is a file; pass a folder for the run")
    return out


def _short(path: Path, width: int = 80) -> str:
    text = str(path)
    return text if len(text) <= width else f"{text[:width // 2]}...{text[-width // 2:]}"


@contextlib.contextmanager
def lock_run(folder, *, create: bool = False, option: str = "--out"):
    """Hold the run folder's write lock (:func:`pvae.files.folder_lock`) for the block: what
    ``pvae train``, ``ppca``, ``evaluate`` and ``repair`` do for as long as they write. With
    ``create`` the folder (an ``option`` such as ``--out``) is checked (:func:`check_out`) and
    created if missing (and removed again if the block leaves it empty).

    :raises RunError: ``option`` is empty, a file, or cannot be created.
    :raises pvae.files.FolderInUseError: another process writes the run.
    :raises pvae.files.UnsafeFolderError: the folder holds symbolic links out of it.
    :raises pvae.files.WriteError: the lock file cannot be written (read-only folder, ...).
    """
    if create:
        folder = check_out(folder, option)
    with files.folder_lock(folder, create=create):
        yield Path(folder)


def prepare_run(out: str | os.PathLike, resume: bool = False, resumable: bool = True) -> Path:
    """Create (or, with ``resume``, check) the run folder ``out``. A folder holds a run once its
    checkpoint exists: a start that failed before the first checkpoint leaves nothing that
    blocks a corrected retry. ``config.json`` is written when training starts
    (:class:`WriteConfig`): the settings that ``fit`` records, the same as the checkpoint's;
    a resume with other settings is refused by ``fit`` against the checkpoint.

    :param bool resumable: whether the command can continue a run (``--resume``); only says
        what the error message suggests.
    :raises RunError: ``out`` is empty or a file; it already holds a run and ``resume`` is
        false; ``resume`` without a run there.
    """
    out = check_out(out)
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
        raise RunError(f"--out {_short(out)} cannot be created ({e.strerror})") from e
    return out


def run_record(config: dict) -> dict:
    """``config`` (the data and model settings a command records beside ``fit``'s own) with
    the run :data:`~pvae.versions.FORMAT` and the :func:`~pvae.versions.versions` of pvae,
    torch and Pyro first: what ``pvae train`` and ``pvae ppca`` pass as ``fit(config=...)``.
    The versions are never compared on resume or evaluation, the format is."""
    return {"format": FORMAT, "versions": versions(), **config}


def stop_reason(out) -> str | None:
    """Why the run in ``out`` was stopped early (a callback's reason, e.g. early stopping), or
    ``None`` (not stopped, or no run there): a resumed, stopped run trains no further.

    :raises CheckpointError: the checkpoint is corrupt or of another format.
    """
    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    reason = load_checkpoint(path, map_location="cpu").get("stop_reason")
    return reason if isinstance(reason, str) else None


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
    """A run's ``config.json``, read within bounds: at most :data:`MAX_CONFIG_BYTES` bytes
    and :data:`MAX_CONFIG_DEPTH` levels of nesting.

    :raises FileNotFoundError: no such file.
    :raises CheckpointError: too large or too deeply nested, not a JSON object, or without
        the keys every run has.
    :raises pvae.versions.FormatError: written in another run format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a folder written by "
                                "`pvae train --out ...`? (`pvae repair RUN` rebuilds a lost "
                                "config.json from the run's checkpoint)")
    repair = f"`pvae repair {path.parent}` rebuilds it from the run's checkpoint"
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes, far more than a "
                              f"run's settings; {repair}")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {repair}") from e
    except RecursionError:
        config = None
    if config is None or _depth(config) > MAX_CONFIG_DEPTH:
        raise CheckpointError(f"{path} nests deeper than {MAX_CONFIG_DEPTH} levels, which no "
                              f"run's settings do; {repair}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (the run's settings), got a "
                              f"{type(config).__name__}")
    check_format(config, path)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {missing}; {repair}")
    return config


def _depth(value) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                pending.append((child, level + 1))
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
    return deepest


def build_model(config: dict, device=None):
    """A fresh model of the run's architecture: ``REGISTRY[config["model"]]`` (a latent-variable
    model or an autoencoder) rebuilt from ``config["model_config"]``.

    :param device: where its tensors are made; ``"meta"`` builds shapes without memory (how
        :func:`load_run` compares a config with a checkpoint before building the model).
    :raises CheckpointError: unknown model name or a ``model_config`` it does not accept.
    """
    name = config.get("model")
    if not isinstance(name, str) or name not in REGISTRY:
        raise CheckpointError(f"unknown model {name!r} in config.json; expected one of "
                              f"{sorted(REGISTRY)}")
    model_config = config.get("model_config")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"config.json's model_config must be an object (the model's "
                              f"constructor arguments), got {type(model_config).__name__}")
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return REGISTRY[name].from_config(model_config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json cannot rebuild the {name} model ({e})") from e


def load_run(run_dir, device="auto", checkpoint: str = "last"):
    """Load a trained run: ``(model, config, checkpoint_state)``, the model in eval mode
    (also ``pvae.load_run``).

    A reader: it takes no lock. The folder is refused if it holds links that lead out of it;
    the model that ``config.json`` describes is built on the ``meta`` device first and its
    tensor shapes compared with the checkpoint's, so a config that asks for a huge model
    beside a small checkpoint fails before any memory is taken.

    :param device: where to put the model (``"auto"``: CUDA when available).
    :param str checkpoint: ``"last"`` (``checkpoint.pt``, the last epoch's) or ``"best"``
        (``best.pt``, the best validation value's).
    :raises FileNotFoundError: no ``config.json`` or no such checkpoint in ``run_dir``.
    :raises CheckpointError: ``config.json`` is not valid JSON, the checkpoint is corrupt, or
        it was written for other settings than ``config.json`` holds, or its tensors do not
        fit the model that ``config.json`` describes.
    :raises pvae.versions.FormatError: the run was written in another format (the message
        names the pvae version that wrote it).
    :raises ValueError: ``checkpoint`` is neither ``"last"`` nor ``"best"``.
    :raises pvae.files.UnsafeFolderError: symbolic links out of ``run_dir``.
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {sorted(CHECKPOINTS)}, got {checkpoint!r}")
    run_dir = Path(run_dir)
    files.check_folder(run_dir)
    config_path = run_dir / CONFIG_NAME
    config = read_config(config_path)
    device = resolve_device(device)
    checkpoint_path = run_dir / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not checkpoint_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {BEST_NAME}: the best epoch is kept when a "
                                "run has validation data (pvae train --num-val N > 0); evaluate "
                                "the last epoch's (--checkpoint last)")
    state = load_checkpoint(checkpoint_path, map_location=device)
    saved = state.get("config", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"{checkpoint_path} has no settings (its config is a "
                              f"{type(saved).__name__}); it is not a complete pvae checkpoint")
    mismatch = settings_diff({k: saved.get(k) for k in config}, config)
    if mismatch:
        raise CheckpointError(f"{checkpoint_path} was written for another config than "
                              f"{config_path} (checkpoint vs config: {mismatch}); retrain or "
                              f"restore the matching config.json (`pvae repair {run_dir}`)")
    _check_state(state, checkpoint_path)
    _check_shapes(build_model(config, device="meta"), state["model"], run_dir, checkpoint_path)
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model in {config_path}: {e}") from e
    model.eval()
    return model, config, state


def _check_shapes(meta_model, saved: dict, run_dir: Path, path: Path) -> None:
    """The checkpoint's model tensors against those of the model that ``config.json``
    describes (built on the meta device): the same names and shapes."""
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()
                if isinstance(v, torch.Tensor)}
    got = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}
    problems = [f"{k} is {got[k]} in the checkpoint but {expected[k]} in the model"
                for k in expected if k in got and got[k] != expected[k]]
    problems += [f"{k} is missing from the checkpoint" for k in expected if k not in got]
    problems += [f"the checkpoint's {k} has no place in the model" for k in got
                 if k not in expected]
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(
            f"{path} does not fit the model that {run_dir / CONFIG_NAME} "
            f"describes: {'; '.join(problems[:2])}{more}; restore the matching config.json "
            f"(`pvae repair {run_dir}` rebuilds it from the checkpoint)")


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


def load_data(config: dict, *, received: bool = False) -> data.Splits:
    """The run's dataset, loaded as its ``config`` says (name, folder, binarization, seed, and
    the options of your own data: ``data_file``, ``image_folder``, ``image_size``,
    ``test_fraction``, :func:`pvae.data.dataset_options`).

    :param bool received: the config comes from a run folder being evaluated, which is data,
        not instructions: nothing is downloaded, ``data_dir`` and the paths of your own data
        are used only if they exist, data whose digest differs from the recorded
        ``data_sha256`` are refused, and settings that cannot be loaded are a
        :class:`CheckpointError`.
    :raises pvae.data.DataNotFoundError: the files are not found.
    :raises pvae.data.DataFileError: your own data cannot be read.
    :raises CheckpointError: (with ``received``) a dataset setting that is not usable, or own
        data that changed since the run was trained.
    """
    data_dir, download = config.get("data_dir"), config.get("download", False)
    name = config["dataset"]
    if not received:
        return data.load(name, data_dir=data_dir, binarize=config.get("binarize"),
                         seed=config["seed"], download=download, **_options(config, name))
    if data_dir is not None and not (isinstance(data_dir, str) and Path(data_dir).is_dir()):
        data_dir = None
    try:
        options = _options(config, name)
        for key in PATH_OPTIONS:
            if key in options and not (isinstance(options[key], str)
                                       and Path(options[key]).exists()):
                raise data.DataNotFoundError(
                    f"the run's data, {options[key]!r} (config.json's {key}), is not found here; "
                    "put the same data at that path to evaluate the run")
        ds = data.load(name, data_dir=data_dir, binarize=config.get("binarize"),
                       seed=config["seed"], download=False, **options)
    except (TypeError, ValueError) as e:
        if isinstance(e, (data.IDXError, data.DataFileError)):
            raise
        raise CheckpointError(f"config.json's data settings cannot be loaded ({e})") from e
    recorded = config.get("data_sha256")
    if recorded is not None and recorded != ds.digest:
        where = next((options[k] for k in PATH_OPTIONS if k in options), name)
        raise CheckpointError(f"the data at {where} are not those the run was trained on (their "
                              f"SHA-256 is {ds.digest}, config.json records {recorded}); restore "
                              "the run's data")
    return ds


def _options(config: dict, name) -> dict:
    """The dataset's own options that ``config`` sets (``None``: the loader's default)."""
    if not isinstance(name, str) or name not in data.DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(data.DATASETS)}")
    return {k: config[k] for k in data.dataset_options(name) if config.get(k) is not None}


def available_memory(device) -> int | None:
    """Bytes that can still be allocated on ``device``: free memory on a CUDA device; on the
    CPU the kernel's ``MemAvailable`` (and the control group's limit, where lower). ``None``
    where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    candidates = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            candidates.append(max(int(limit) - used, 0))
    return min(candidates) if candidates else None


def new_model(cls, kwargs: dict, device="cpu", *, training: bool = True):
    """``cls(**kwargs)``, its size checked first: built on the ``meta`` device (shapes, no
    memory), its parameters and buffers counted, and refused when they (times
    :data:`TRAINING_MEMORY_FACTOR` for training: weights, gradients, Adam's moments) exceed
    the memory available on ``device`` (:func:`available_memory`).

    :raises RunError: the model would not fit, with its size and the memory available.
    :raises ValueError: the model's own checks of its arguments.
    """
    with torch.device("meta"):
        meta = cls(**kwargs)
    size = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    count = sum(p.numel() for p in meta.parameters())
    device = resolve_device(device)
    # built on the CPU first, then trained on ``device``
    needs = [(torch.device("cpu"), size, "")]
    if training:
        needs.append((device, size * TRAINING_MEMORY_FACTOR,
                      f"training needs about {TRAINING_MEMORY_FACTOR} times that (weights, "
                      f"gradients and Adam's two moments), {_gb(size * TRAINING_MEMORY_FACTOR)}, "))
    for where, need, why in needs:
        free = available_memory(where)
        if free is not None and need > free:
            raise RunError(f"the {cls.__name__} asked for has {count:,} parameters "
                           f"({_gb(size)}); {why}more than the {_gb(free)} available on "
                           f"{where}: choose smaller sizes (--latent-dim, --hidden-dims)")
    return cls(**kwargs)


def _gb(size: int) -> str:
    """A byte count in GiB, TiB or PiB, three digits."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size / 2**30:.3g} GiB"


def repair_run(run_dir) -> list[str]:
    """Rebuild what a run folder lost from its checkpoint, which holds the run's settings
    (``state["config"]``) and history: ``config.json`` where it is missing, unreadable or
    disagrees with the checkpoint, ``history.csv`` where it is missing. The caller holds the
    folder's lock (``pvae repair`` does).

    :returns: the names of the files written (empty: nothing to repair).
    :raises FileNotFoundError: no checkpoint in ``run_dir``.
    :raises CheckpointError: the checkpoint is corrupt or lacks the run's settings.
    """
    run_dir = Path(run_dir)
    files.check_folder(run_dir)
    checkpoint = run_dir / CHECKPOINT_NAME
    state = load_checkpoint(checkpoint, map_location="cpu")
    saved = state.get("config")
    if not isinstance(saved, dict) or any(k not in saved for k in REQUIRED_KEYS):
        raise CheckpointError(f"{checkpoint} does not hold a run's settings (the keys "
                              f"{list(REQUIRED_KEYS)}): it was not written by pvae train, so "
                              "config.json cannot be rebuilt from it")
    _check_state(state, checkpoint)
    written = []
    try:
        config = read_config(run_dir / CONFIG_NAME)
        intact = not settings_diff({k: saved.get(k) for k in config}, config)
    except (FileNotFoundError, CheckpointError):
        intact = False
    if not intact:
        write_json(run_dir / CONFIG_NAME, saved)
        written.append(CONFIG_NAME)
    if not (run_dir / HISTORY_NAME).is_file() and state.get("history"):
        History(state["history"]).to_csv(run_dir / HISTORY_NAME)
        written.append(HISTORY_NAME)
    return written
