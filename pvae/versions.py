"""What wrote a run: the format number of run folders and checkpoints, and the versions of
pvae, torch and Pyro that wrote them.

Every checkpoint (:func:`pvae.train.save_checkpoint`) and every ``config.json`` that ``pvae
train`` and ``pvae ppca`` write records :data:`FORMAT` and :func:`versions`. A reader refuses
another format with a message naming the version that wrote it (:func:`check_format`);
versions alone never make a run unreadable (they are left out of the settings that a resume or
an evaluation compares).

The versions are read from the installed distributions' metadata (``importlib.metadata``):
nothing here imports Pyro, so the training engine stays blind to it.
"""

from __future__ import annotations

import functools
import importlib.metadata

__all__ = ["FORMAT", "FormatError", "__version__", "check_format", "versions"]

#: pvae's version (the one place it is written: ``pvae.__version__`` and the distribution's
#: metadata, ``pyproject.toml``, read it from here).
__version__ = "0.1.0"

#: The layout of run folders and checkpoints that this pvae writes and reads. Raise it when a
#: change makes older runs unreadable (keys renamed, state laid out differently), and keep a
#: run folder of the new format in ``tests/fixtures``. A record without a number is format 1
#: (pvae 0.1.0 wrote format 1 before it stamped it).
FORMAT = 1

#: The distributions whose versions are recorded: ``{key: distribution name}``.
_DISTRIBUTIONS = {"torch": "torch", "pyro": "pyro-ppl"}


class FormatError(ValueError):
    """A run folder or checkpoint of another format than this pvae reads."""


@functools.cache
def versions() -> dict[str, str | None]:
    """``{"pvae": ..., "torch": ..., "pyro": ...}``: the versions of the code that runs now
    (pvae's own is :data:`__version__`, also when it runs from a source tree; ``None`` for a
    distribution that is not installed)."""
    found = {"pvae": __version__}
    for key, name in _DISTRIBUTIONS.items():
        try:
            found[key] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[key] = None
    return found


def check_format(record: dict, where) -> None:
    """Refuse ``record`` (a checkpoint or a run's ``config.json``, read from ``where``) unless
    it has this pvae's :data:`FORMAT` (no number: format 1).

    :raises FormatError: another format, naming the pvae version that wrote it.
    """
    found = record.get("format", 1)
    if found == FORMAT:
        return
    wrote = record.get("versions")
    by = (f"pvae {wrote.get('pvae')}" if isinstance(wrote, dict) and wrote.get("pvae")
          else "another pvae")
    raise FormatError(f"{where} was written by {by} in run format {found!r}; this pvae "
                      f"({versions()['pvae']}) reads format {FORMAT}: use that pvae version "
                      "to evaluate or resume it, or retrain")
