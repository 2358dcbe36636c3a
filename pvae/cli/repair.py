"""``pvae repair``: rebuild what a run folder lost (``config.json``, ``history.csv``) from its
checkpoint, which holds the run's settings and history."""

from __future__ import annotations

from pathlib import Path

from pvae.runs import repair_run

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    r = sub.add_parser("repair", help="rebuild a run folder's config.json and history.csv from "
                       "its checkpoint")
    r.add_argument("run", help="run folder holding checkpoint.pt")
    r.set_defaults(func=run)


def run(args) -> None:
    """``pvae repair RUN``: :func:`pvae.runs.repair_run` under the run's lock; prints what was
    rewritten."""
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder; pass a run folder that holds "
                                "checkpoint.pt")
    written = repair_run(run_dir)
    if written:
        print(f"rebuilt {', '.join(written)} in {run_dir} from its checkpoint")
    else:
        print(f"{run_dir} is intact: config.json agrees with the checkpoint and history.csv "
              "exists")
