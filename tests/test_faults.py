"""Faults: garbage files and values (fuzzed with hypothesis, within a bounded number of
examples), checkpoints that carry code, and training killed at random moments."""

import gzip
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pvae import data
from pvae.runs import load_run
from pvae.train import CheckpointError
from pvae.validation import check_count, check_float, check_sizes

FUZZ = settings(max_examples=150, deadline=None)


@FUZZ
@given(st.binary(max_size=64), st.booleans())
def test_read_idx_garbage_is_an_idx_error(raw, gzipped):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("f.gz" if gzipped else "f")
        if gzipped:
            with gzip.open(path, "wb") as f:
                f.write(raw)
        else:
            path.write_bytes(raw)
        try:
            out = data.read_idx(path)
        except data.IDXError:
            return
        assert isinstance(out, np.ndarray)  # the rare valid file: read as its header says


@FUZZ
@given(st.lists(st.integers(0, 4), min_size=1, max_size=3), st.integers(-3, 3))
def test_read_idx_truncated_or_padded(shape, extra):
    """A valid header with too few or too many bytes after it is refused, never misread."""
    body = bytes(int(np.prod(shape)) + extra) if int(np.prod(shape)) + extra >= 0 else b""
    raw = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape) + body
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f"
        path.write_bytes(raw)
        if extra == 0 or len(body) == int(np.prod(shape)):
            assert data.read_idx(path).shape == tuple(shape)
        else:
            with pytest.raises(data.IDXError, match="truncated or corrupt"):
                data.read_idx(path)


ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(),
                     st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3),
                     st.tuples(st.floats(), st.integers()))


def _a_count(v) -> bool:
    """The contract of ``check_count`` (minimum 1), written out independently."""
    return (isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            and 1 <= v <= 2**63 - 1)


@FUZZ
@given(ANYTHING)
@example(float("nan"))
@example(float("inf"))
@example(float("-inf"))
@example(np.float64("nan"))
@example(np.float32("inf"))
@example([1, float("nan")])
@example((float("inf"), 3))
@example(np.int64(3))
@example(0.0)
@example(2**63)
def test_validators_accept_or_name_the_parameter(value):
    """Each validator accepts exactly the values of its contract (written out here on its own)
    and returns them as the plain type; any other value, NaN and inf included, is refused with
    an error that names the parameter."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    as_float = lambda v: check_float("num_things", v, minimum=0.0)  # noqa: E731
    contracts = [
        (lambda v: check_count("num_things", v), _a_count(value),
         lambda out: type(out) is int and out == value),
        (lambda v: check_sizes("num_things", v),
         isinstance(value, (list, tuple)) and all(map(_a_count, value)),
         lambda out: type(out) is tuple and list(out) == list(value)
         and all(type(o) is int for o in out)),
        (as_float, real and math.isfinite(value) and value >= 0,
         lambda out: type(out) is float and math.isfinite(out) and out >= 0
         and out == float(value)),
    ]
    for check, valid, returned in contracts:
        try:
            out = check(value)
        except (TypeError, ValueError) as e:
            assert not valid, f"{value!r} refused: {e}"
            assert "num_things" in str(e)
            if check is as_float and real and not math.isfinite(value):
                assert isinstance(e, ValueError)  # NaN, inf: a bad value, not a bad type
        else:
            assert valid, f"{value!r} accepted as {out!r}"
            assert returned(out), (value, out)


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    """A checkpoint whose pickle would run a command when unpickled is refused
    (``weights_only=True``) and the command never runs."""
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run / "checkpoint.pt").write_bytes(pickle.dumps({"model": Exploit()}))
    (run / "config.json").write_text(json.dumps({"dataset": "digits", "seed": 0, "model": "vae",
                                                 "model_config": {"x_dim": 64,
                                                                  "latent_dim": 2}}))
    with pytest.raises(CheckpointError, match="corrupt or not a pvae checkpoint"):
        load_run(run, device="cpu")
    assert not marker.exists()


TRAIN = [sys.executable, "-m", "pvae.cli", "train", "--dataset", "digits", "--latent-dim", "4",
         "--hidden-dims", "64", "--num-epochs", "30", "--num-val", "100", "--no-progress",
         "--device", "cpu", "--lr", "3e-3", "--lr-schedule", "cosine", "--warmup-steps", "10"]
TIMING = ("seconds", "images_per_s")  # the history's wall-clock columns


def _launch(out, resume=False):
    """Start ``pvae train`` (its stderr to ``out``'s sibling ``<out>.err``, read on failure)."""
    with open(f"{out}.err", "w") as err:
        return subprocess.Popen([*TRAIN, "--out", str(out), *(["--resume"] if resume else [])],
                                stdout=subprocess.DEVNULL, stderr=err)


def _finish(proc, out):
    assert proc.wait(timeout=120) == 0, Path(f"{out}.err").read_text()


def _stamp(path):
    """What changes when the checkpoint is replaced (atomically: a new file renamed over it)."""
    try:
        s = path.stat()
    except FileNotFoundError:
        return None
    return s.st_ino, s.st_mtime_ns


def _wait_for_new_checkpoint(proc, path, before, timeout=120.0):
    """Poll until ``path`` differs from ``before`` (the process saved an epoch) or the process
    ends; returns the time the new checkpoint was seen, or None."""
    t0 = time.perf_counter()
    while _stamp(path) == before:
        if proc.poll() is not None:
            return None
        assert time.perf_counter() - t0 < timeout, "no checkpoint written"
        time.sleep(0.002)
    return time.perf_counter()


def _saved_epoch(path):
    return torch.load(path, weights_only=True)["epoch"] if path.is_file() else 0


def _history(run):
    """history.csv's rows without the wall-clock columns."""
    header, *rows = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(header) if name not in TIMING]
    assert {"train_elbo", "val_elbo", "lr"} <= {header[i] for i in keep}
    return [[header[i] for i in keep]] + [[row[i] for i in keep] for row in rows]


@pytest.mark.slow
def test_killed_at_random_moments_then_resumed_equals_uninterrupted(tmp_path):
    """kill -9 at random moments after a run has saved at least one epoch (mid-epoch,
    mid-checkpoint, mid-validation): each restart resumes from the last checkpoint, which
    always loads, at least 3 restarts begin from a saved epoch > 0 and go on from it, and the
    finished run's history (every column but the wall-clock ones, the learning rate of a
    warm-up-then-cosine schedule included) and its model, optimizer and scheduler state equal
    an uninterrupted run's exactly; no temporary files are left. The kill delay is drawn in
    units of the uninterrupted run's measured epoch time, so the test kills relative to
    progress on a slow or a fast machine alike."""
    whole = tmp_path / "whole"
    proc, saved = _launch(whole), []  # the uninterrupted run, timing its epochs
    while (seen := _wait_for_new_checkpoint(proc, whole / "checkpoint.pt",
                                            _stamp(whole / "checkpoint.pt"))) is not None:
        saved.append(seen)
    _finish(proc, whole)
    epoch_seconds = (saved[-1] - saved[0]) / max(len(saved) - 1, 1)

    rng = random.Random(0)
    out, path = tmp_path / "killed", tmp_path / "killed" / "checkpoint.pt"
    kills, resumed_from = 0, []
    while True:
        resume = path.is_file()
        start = _saved_epoch(path)  # whatever the kill interrupted, the checkpoint loads
        if resume:
            assert start > 0
            resumed_from.append(start)
        proc = _launch(out, resume=resume)
        if kills < 4:
            seen = _wait_for_new_checkpoint(proc, path, _stamp(path))
            assert seen is not None, Path(f"{out}.err").read_text()
            # the new checkpoint goes on from the one resumed (a fresh start would save epoch 1)
            assert _saved_epoch(path) > start
            time.sleep(rng.uniform(0.0, 2.5) * epoch_seconds)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _finish(proc, out)
        break
    print(f"epoch {epoch_seconds:.3f} s; resumed from epochs {resumed_from}")
    assert kills == 4 and len(resumed_from) >= 3 and min(resumed_from) >= 1
    assert _history(out) == _history(whole)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(path, weights_only=True)
    assert a["epoch"] == b["epoch"] == 30
    for part in ("model", "optimizer", "scheduler"):
        assert _equal(a[part], b[part]), part
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def _equal(a, b):
    """Exact equality of nested state dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b
