"""The ``pvae`` command line: ``pvae train``, ``pvae evaluate``, ``pvae ppca``.

Each command parses its arguments, works through :mod:`pvae.runs` (run folders: one folder
per run), the training engine and evaluation, and prints a summary. Expected errors (bad
input, missing data, refused checkpoints) end the command with a one-line ``pvae: <message>``
on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import sys

from pvae.cli import evaluate, ppca, train
from pvae.data import DataNotFoundError, IDXError
from pvae.runs import RunError, build_model, load_run
from pvae.train import CheckpointError

__all__ = ["build_model", "load_run", "main"]

#: Errors that a user can fix: shown as one line, no traceback.
EXPECTED_ERRORS = (RunError, CheckpointError, DataNotFoundError, IDXError, FileNotFoundError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, ppca):
        command.add_parser(sub)
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if getattr(args, "likelihood_scale", "learned") != "learned":
        try:
            args.likelihood_scale = float(args.likelihood_scale)
        except ValueError:
            sys.exit(f"pvae: --likelihood-scale must be 'learned' or a number, got "
                     f"{args.likelihood_scale!r}")
    try:
        args.func(args)
    except EXPECTED_ERRORS as e:
        sys.exit(f"pvae: {e}")


if __name__ == "__main__":
    main()
