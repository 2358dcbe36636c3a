"""The per-epoch training record."""

from __future__ import annotations

import csv
import io
import os

from pvae.files import write_text

__all__ = ["History"]


class History:
    """Per-epoch training record: a list of rows (dicts) with the columns

    ``epoch``, ``train_elbo`` and ``val_elbo`` (nats per datapoint, higher is better),
    ``seconds`` and ``images_per_s``; an objective with another ``value_name`` (an
    autoencoder's: ``train_loss``, ``val_loss``, lower is better) names its own columns.

    ``lr``, ``beta`` and what callbacks add; the row of the epoch after which a callback stopped
    the run holds the reason in ``stopped``.

    :ivar stop_reason: why a callback ended the run early (``None``: it was not stopped).
    """

    def __init__(self, rows: list[dict] | None = None, stop_reason: str | None = None):
        self.rows = list(rows or [])
        self.stop_reason = stop_reason

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self):
        return f"History({len(self)} epochs, last={self.rows[-1] if self.rows else None})"

    def column(self, name: str) -> list:
        return [row.get(name) for row in self.rows]

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write the rows to ``path`` as CSV, atomically (:func:`pvae.files.write_text`: a fresh
        temporary file renamed into place, never through a link); nothing for an empty history.

        :raises pvae.files.WriteError: the file cannot be written.
        """
        if not self.rows:
            return
        text = io.StringIO(newline="")
        columns = list(dict.fromkeys(k for row in self.rows for k in row))  # in first-seen order
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(path, text.getvalue())
