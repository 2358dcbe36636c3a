"""Faults: garbage files and values (fuzzed with hypothesis, within a bounded number of
examples), checkpoints that carry code, and training killed at random moments."""

import gzip
import json
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
from hypothesis import given, settings
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


@FUZZ
@given(ANYTHING)
def test_validators_accept_or_name_the_parameter(value):
    for check in (lambda v: check_count("num_things", v), lambda v: check_sizes("num_things", v),
                  lambda v: check_float("num_things", v, minimum=0.0)):
        try:
            out = check(value)
        except (TypeError, ValueError) as e:
            assert "num_things" in str(e)
        else:
            assert out is not None and not isinstance(out, bool)


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
         "--hidden-dims", "64", "--num-epochs", "40", "--num-val", "100", "--no-progress",
         "--device", "cpu"]


def _train(out, resume=False, kill_after=None):
    """Run ``pvae train``; with ``kill_after`` seconds, SIGKILL it then (if still running)."""
    proc = subprocess.Popen([*TRAIN, "--out", str(out), *(["--resume"] if resume else [])],
                            stdout=subprocess.DEVNULL, text=True,
                            stderr=subprocess.PIPE if kill_after is None else subprocess.DEVNULL)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return True
    try:
        proc.wait(timeout=kill_after)
        return True  # finished before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return False


@pytest.mark.slow
def test_killed_at_random_moments_then_resumed_equals_uninterrupted(tmp_path):
    """kill -9 at random moments (mid-epoch, mid-checkpoint): each restart resumes from the
    last checkpoint, which always loads, and the finished run's history equals an
    uninterrupted run's to the last digit; no temporary files are left."""
    _train(tmp_path / "whole")
    rng = random.Random(0)
    out, kills = tmp_path / "killed", 0
    t0 = time.perf_counter()
    done = False
    while not done and time.perf_counter() - t0 < 300:
        resume = (out / "checkpoint.pt").is_file()
        if resume:  # whatever the kill interrupted, the checkpoint there is whole
            torch.load(out / "checkpoint.pt", weights_only=True)
        done = _train(out, resume=resume, kill_after=rng.uniform(1.5, 4.0) if kills < 6 else None)
        kills += not done
    assert done and kills >= 3
    whole = (tmp_path / "whole" / "history.csv").read_text().splitlines()
    killed = (out / "history.csv").read_text().splitlines()
    column = [row.split(",")[1] for row in whole]  # train_elbo
    assert [row.split(",")[1] for row in killed] == column
    assert not list(out.glob(".*.tmp"))
