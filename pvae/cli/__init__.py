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
from pvae.train import CheckpointError, TrainingDivergedError

__all__ = ["build_model", "load_run", "main"]

#: Errors that a user can fix: one line, exit code 2 (bad usage or input).
USAGE_ERRORS = (RunError, CheckpointError, DataNotFoundError, IDXError, FileNotFoundError,
                NotADirectoryError, IsADirectoryError)
#: Failures of a run that was set up right: one line, exit code 1.
RUN_ERRORS = (TrainingDivergedError,)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``pvae: ...`` line (exit code 2), like every other
    expected error of the command line."""

    def error(self, message):
        self.exit(2, f"pvae: {self.prog.removeprefix('pvae ')}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pvae", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, ppca):
        command.add_parser(sub)
    return parser


def _fail(code: int, message: str) -> None:
    print(f"pvae: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> None:
    """Run the ``pvae`` command (``argv`` defaults to ``sys.argv[1:]``).

    Exit codes: 0 on success, 2 for bad usage or input (a one-line ``pvae: ...`` message on
    stderr), 1 when a run fails (training diverged), 130 when interrupted (Ctrl-C; the last
    checkpoint is intact). ``--debug`` shows tracebacks instead.
    """
    args = _parser().parse_args(argv)
    if args.debug:
        args.func(args)
        return
    try:
        args.func(args)
    except USAGE_ERRORS as e:
        _fail(2, " ".join(str(e).split()))
    except RUN_ERRORS as e:
        _fail(1, str(e))
    except KeyboardInterrupt:
        _fail(130, "interrupted; the last checkpoint written (if any) is intact: continue with "
              "--resume")


if __name__ == "__main__":
    main()
