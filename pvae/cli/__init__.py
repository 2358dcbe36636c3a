"""The ``pvae`` command line: ``pvae train``, ``pvae evaluate``, ``pvae ppca``, ``pvae repair``.

Each command parses its arguments, works through :mod:`pvae.runs` (run folders: one folder
per run), the training engine and evaluation, and prints a summary. A command that writes a
run folder holds its lock for as long as it runs (one writer per run). Expected errors (bad
input, missing data, refused checkpoints, a file that cannot be written, a signal) end the
command with a one-line ``pvae: <message>`` on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from pvae.cli import configs, evaluate, ppca, repair, train
from pvae.data import DataFileError, DataNotFoundError, IDXError
from pvae.files import FolderInUseError, UnsafeFolderError, WriteError
from pvae.runs import RunError, build_model, load_run, lock_run
from pvae.train import CHECKPOINT_NAME, CheckpointError, TrainingDivergedError
from pvae.train.checkpoint import last_saved_epoch
from pvae.versions import FormatError

__all__ = ["Terminated", "build_model", "load_run", "main"]

#: Errors that a user can fix: one line, exit code 2 (bad usage or input).
USAGE_ERRORS = (RunError, CheckpointError, DataNotFoundError, IDXError, DataFileError,
                FormatError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                FolderInUseError, UnsafeFolderError)
#: Failures of a run that was set up right: one line, exit code 1.
RUN_ERRORS = (TrainingDivergedError, WriteError)
#: The run folder each command writes: ``(argument, create it)``.
RUN_FOLDERS = {"train": ("out", True), "ppca": ("out", True), "evaluate": ("run", False),
               "repair": ("run", False)}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Slurm, ``docker stop``), handled as Ctrl-C: a file being written is
    completed first (:func:`pvae.files.deferred_signals`), then the command ends with exit code
    143."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``pvae: ...`` line (exit code 2), like every other
    expected error of the command line."""

    def error(self, message):
        command = self.prog.removeprefix("pvae").strip()
        self.exit(2, f"pvae: {command + ': ' if command else ''}{message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pvae", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, ppca, repair):
        command.add_parser(sub)
    return parser


def _fail(code: int, message: str) -> None:
    print(f"pvae: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def _interrupted(args, signal_name: str) -> str:
    """What an interrupted command leaves, in its own words."""
    if args.command == "train" and args.out is not None:
        epoch = last_saved_epoch(os.path.join(args.out, CHECKPOINT_NAME))
        kept = ("the last checkpoint written (if any) is intact" if epoch is None else
                f"the last checkpoint (epoch {epoch}) is intact")
        return f"{signal_name}; {kept}: continue with --resume"
    if args.command == "evaluate":
        return (f"{signal_name}; the files of {args.run} are whole (each is written completely "
                "or not at all): run pvae evaluate again for the rest")
    return f"{signal_name}; files already written are whole: run the command again"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` while the command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_folder(args):
    """The lock of the run folder the command writes (rank 0 alone under ``torchrun``); none
    for ``evaluate``/``repair`` of a path that is not a folder (they say so themselves)."""
    argument, create = RUN_FOLDERS.get(args.command, (None, False))
    folder = getattr(args, argument, None) if argument else None
    if folder is None or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    if not create and not os.path.isdir(folder):
        return contextlib.nullcontext()
    return lock_run(folder, create=create, option=f"--{argument}")


def _command(parser, argv, args) -> None:
    """The command, with the flags of ``--config FILE`` (``pvae train``) read first, under the
    lock of the run folder it writes."""
    if getattr(args, "config", None) is not None:
        vars(args).update(vars(configs.expand(parser, argv, args)))
    with _sigterm_as_interrupt(), _run_folder(args):
        args.func(args)


@contextlib.contextmanager
def _pvae_log_to_stderr():
    """pvae's own log lines (early stopping, a finished run resumed, an eager step) as they
    are, on the stderr of the moment, while the command runs."""
    logger = logging.getLogger("pvae")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _out_of_memory(error: BaseException) -> bool:
    """An allocation failure: Python's ``MemoryError``, or torch's on the CPU ("can't allocate
    memory") or a GPU ("out of memory")."""
    text = str(error)
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower()))


def main(argv=None) -> None:
    """Run the ``pvae`` command (``argv`` defaults to ``sys.argv[1:]``).

    Exit codes: 0 on success; 2 for bad usage or input, including a run folder that another
    process is writing or that holds links out of it; 1 when a run fails (training diverged,
    a file cannot be written: full disk, read-only file system..., out of memory); 130 when
    interrupted by Ctrl-C and 143 by SIGTERM (the file being written is completed first, the
    last checkpoint is intact). Each error is one ``pvae: ...`` line on stderr; ``--debug``
    shows tracebacks instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.debug:
        with _pvae_log_to_stderr():
            _command(parser, argv, args)
        return
    try:
        with _pvae_log_to_stderr():
            _command(parser, argv, args)
    except USAGE_ERRORS as e:
        _fail(2, e)
    except RUN_ERRORS as e:
        _fail(1, e)
    except OSError as e:  # reading or writing outside pvae's own writers
        where = f"{e.filename}: " if e.filename else ""
        _fail(1, f"{where}{e.strerror or e}")
    except RecursionError:
        _fail(2, "an input nests too deeply to be read")
    except Terminated:
        _fail(143, _interrupted(args, "terminated (SIGTERM)"))
    except KeyboardInterrupt:
        _fail(130, _interrupted(args, "interrupted"))
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        _fail(1, f"out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                 "the model or a batch is too large for this device; choose smaller sizes "
                 "(--latent-dim, --hidden-dims, --batch-size, --num-samples, "
                 "--num-elbo-samples)")


if __name__ == "__main__":
    main()
