"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from pvae import parallel
from pvae.files import (
    FolderLostError,
    WriteError,
    atomic_writer,
    deferred_signals,
    folder_lock,
    holds_lock,
)
from pvae.versions import FORMAT, check_format, versions

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "checkpoint_folder", "get_rng_state",
           "last_saved_epoch", "load_checkpoint", "save_checkpoint", "set_rng_state"]

#: File name of the checkpoint in a run folder or ``checkpoint_dir``.
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is corrupt or belongs to another configuration."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`pvae.files.atomic_writer`): a fresh
    temporary file in the same folder, never through a link, flushed to disk, then renamed over
    ``path``. A kill at any moment leaves either the previous or the new checkpoint; Ctrl-C or
    SIGTERM during the write take effect once the file is complete. Temporary files that killed
    saves left behind are removed when the folder's lock is taken (:func:`checkpoint_folder`).
    The file records the run format and the pvae, torch and Pyro versions that wrote it
    (``"format"``, ``"versions"``: :mod:`pvae.versions`).

    :raises pvae.files.WriteError: the file cannot be written (full disk, read-only file
        system, ...); the message names the last good checkpoint's epoch.
    :raises pvae.files.FolderLostError: the folder this process locked was deleted or moved.
    """
    path = Path(path)
    key = os.path.realpath(path)
    with deferred_signals():  # (until the epoch written is recorded)
        try:
            with atomic_writer(path, make_parents=not holds_lock(path.parent)) as f:
                torch.save({**state, "format": FORMAT, "versions": versions()}, f)
        except FolderLostError:
            raise
        except WriteError as e:
            raise WriteError(f"{e}; {_last_good(path, key)}", e.errno, e.filename) from e
        if isinstance(state.get("epoch"), int):
            _last_saved[key] = state["epoch"]


#: The epoch of the last checkpoint this process wrote, by real path.
_last_saved: dict[str, int] = {}


def last_saved_epoch(path: str | os.PathLike) -> int | None:
    """The epoch of the last checkpoint this process wrote to ``path``, if any."""
    return _last_saved.get(os.path.realpath(path))


def _last_good(path: Path, key: str) -> str:
    """What is left on disk after a failed save: "the last good checkpoint is epoch N"."""
    epoch = _last_saved.get(key)
    if epoch is None and path.is_file():
        try:
            epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        except Exception:  # noqa: BLE001 - only for the message
            return f"the earlier checkpoint {path} is untouched"
    if epoch is None:
        return "no checkpoint has been written yet"
    return f"the last good checkpoint is epoch {epoch} ({path}), untouched"


@contextlib.contextmanager
def checkpoint_folder(checkpoint_dir, *, resume: bool = False, distributed: bool = False):
    """The folder that ``fit(checkpoint_dir=...)`` writes, held for the whole run: created if
    missing, locked against a second writer (:func:`pvae.files.folder_lock`; by rank 0 alone
    with ``distributed``), and refused when it already holds a run's checkpoint unless
    ``resume``. Yields the checkpoint's path (``None`` without ``checkpoint_dir``).

    :raises ValueError: ``checkpoint_dir`` is an empty string.
    :raises CheckpointError: the folder holds a checkpoint and ``resume`` is false.
    :raises pvae.files.FolderInUseError: another process writes the folder.
    :raises pvae.files.UnsafeFolderError: the folder holds symbolic links out of it.
    :raises pvae.files.WriteError: the folder cannot be created or locked.
    """
    if checkpoint_dir is None:
        yield None
        return
    if not str(checkpoint_dir).strip():
        raise ValueError("checkpoint_dir is an empty string; pass a folder (or None for no "
                         "checkpoints)")
    folder = Path(checkpoint_dir)
    path = folder / CHECKPOINT_NAME
    held, error = contextlib.ExitStack(), None
    if not distributed or parallel.rank() == 0:
        try:
            held.enter_context(folder_lock(folder, create=True))
            if path.is_file() and not resume:
                raise CheckpointError(
                    f"checkpoint_dir {folder} already holds a run's checkpoint ({CHECKPOINT_NAME}); "
                    "pass resume=True to continue it, or choose another checkpoint_dir")
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            held.close()
            error = e
    if distributed:
        error = parallel.broadcast(error)
    if error is not None:
        raise error
    with held:
        yield path


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    :raises FileNotFoundError: no file at ``path``.
    :raises CheckpointError: the file is truncated, corrupt or not a pvae checkpoint.
    :raises pvae.versions.FormatError: it was written in another run format (the message names
        the pvae version that wrote it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first (pvae train --out ...)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or not a pvae checkpoint ({e})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a pvae checkpoint (no model state)")
    check_format(state, path)
    return state


def get_rng_state(generator: torch.Generator) -> dict:
    """Every RNG that training draws from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["generator"].cpu())
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
