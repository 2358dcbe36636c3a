"""The bad-input and fault catalogue: public API and command-line calls that must fail with a
clear error, or be handled correctly with nothing lost. Each case is ``(id, category, call,
expected, pattern)`` or ``(id, category, call, expected, pattern, after)``:

- ``call()`` makes the bad call (a CLI case returns ``cli([...])``'s result);
- ``expected`` is the exception class, or for the CLI the exit code; ``None`` for a fault that
  must be handled without an error;
- ``pattern`` must match the message: it names the parameter (or file) that is wrong;
- ``after()``, where given, checks that nothing was lost or written where it must not be
  (the file a link points to is unchanged, the last good checkpoint loads, ...): it raises
  ``AssertionError`` otherwise.

The categories after ``cli`` are the families of faults of run folders (issue 28):
``concurrency`` (two writers, locks), ``filesystem`` (full disk, read-only files, folders lost
while written, names too long), ``signals`` (SIGTERM, Ctrl-C, SIGKILL), ``hostile-files``
(run folders and data files received from elsewhere: links out, gzip bombs, absurd headers and
sizes, deep JSON) and ``api``; then those of watching and steering runs (issue 29): ``flags``
(model-, estimator- and schedule-specific flags, optimizers, early stopping, loggers),
``own-data`` (``--data-file`` and ``--image-folder``: truncated files, wrong dtypes and shapes,
mixed sizes, empty folders), ``config-file`` (``--config``) and ``versions`` (run formats).

``tests/test_bad_input.py`` runs them. Only public names are used (and ``pvae.files``), so the
same catalogue can be run against an older pvae to count how many answers were clear,
handled, unclear, silent or lost.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pvae import data
from pvae.cli import main
from pvae.inference import ReparamELBO, elbo_terms, impute, iw_log_likelihood
from pvae.models import CVAE, PPCA, VAE, compare_posteriors
from pvae.train import Adam, ExponentialLR, fit

X = torch.bernoulli(torch.full((32, 12), 0.5), generator=torch.Generator().manual_seed(0))


def vae():
    return VAE(12, 2, (8,))


def cli(argv):
    """Run the command line in-process: ``(exit code, stderr)``; 0 when it returns."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):  # sys.exit("message") prints it and exits with 1
                err.write(code + "\n")
                code = 1
            return code, err.getvalue()
    return 0, err.getvalue()


class NoParams(nn.Module):
    """A model whose networks are created on the first call (lazy): no parameters yet."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(logits=x.new_zeros(x.shape)).to_event(1), obs=x)

    def guide(self, x):
        pass


class GuideMissesASite(nn.Module):
    """The model has a latent site ``w`` that the guide does not sample."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(2))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            logits = (z.sum(-1) + w).unsqueeze(-1).expand(*w.shape, x.shape[-1])
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc.expand(x.shape[0], 2), 1.0).to_event(1))


class JointGaussianLikelihood(nn.Module):
    """x | z ~ N(z 1, I) as one MultivariateNormal: its entries cannot be scored apart."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            cov = torch.eye(x.shape[-1], dtype=x.dtype)
            pyro.sample("x", dist.MultivariateNormal(z.unsqueeze(-1) + 0 * x, cov),
                        obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.mean(-1), 1.0))


def digits_run(tmp):
    """A trained 1-epoch digits run folder under ``tmp`` (made once per folder)."""
    run = tmp / "run"
    if not (run / "checkpoint.pt").exists():
        main(["train", "--dataset", "digits", "--latent-dim", "2", "--hidden-dims", "8",
              "--num-epochs", "1", "--num-val", "20", "--out", str(run), "--no-progress"])
    return run


def edited_run(tmp, name, edit):
    """A copy of the digits run with ``edit(folder)`` applied."""
    import shutil

    run = tmp / name
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(digits_run(tmp), run)
    edit(run)
    return run


def _write(path, text):
    path.write_text(text)


def _checkpoint(run, change):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, run / "checkpoint.pt")


def _nan_weights(state):
    first = next(iter(state["model"]))
    state["model"][first] = torch.full_like(state["model"][first], float("nan"))


def cases(tmp):
    """The catalogue; ``tmp`` is a scratch folder (a ``pathlib.Path``)."""
    train = ["train", "--dataset", "digits", "--latent-dim", "2", "--hidden-dims", "8",
             "--num-epochs", "1", "--no-progress", "--num-val", "20"]
    out = str(tmp / "cli-out")
    return [
        # -- models ------------------------------------------------------------------------
        ("vae-x-dim-0", "model", lambda: VAE(0, 2), ValueError, "x_dim"),
        ("vae-latent-0", "model", lambda: VAE(12, 0), ValueError, "latent_dim"),
        ("vae-latent-bool", "model", lambda: VAE(12, True), TypeError, "latent_dim"),
        ("vae-latent-float", "model", lambda: VAE(12, 2.0), TypeError, "latent_dim"),
        ("vae-hidden-str", "model", lambda: VAE(12, 2, "400"), TypeError, "hidden_dims"),
        ("vae-hidden-float", "model", lambda: VAE(12, 2, (2.7,)), TypeError, "hidden_dims"),
        ("vae-hidden-zero", "model", lambda: VAE(12, 2, (0,)), ValueError, "hidden_dims"),
        ("vae-likelihood", "model", lambda: VAE(12, 2, likelihood="poisson"), ValueError,
         "likelihood"),
        ("vae-scale-negative", "model",
         lambda: VAE(12, 2, likelihood="gaussian", likelihood_scale=-1.0), ValueError, "scale"),
        ("vae-activation", "model", lambda: VAE(12, 2, activation="gelu"), ValueError,
         "activation"),
        ("cvae-x-dim-0", "model", lambda: CVAE(0, 2, num_classes=3), ValueError, "x_dim"),
        ("cvae-no-condition", "model", lambda: CVAE(12, 2), ValueError, "num_classes"),
        ("cvae-classes-0", "model", lambda: CVAE(12, 2, num_classes=0), ValueError,
         "num_classes"),
        ("cvae-prior", "model", lambda: CVAE(12, 2, num_classes=3, prior="flat"), ValueError,
         "prior"),
        ("ppca-latent-too-big", "model", lambda: PPCA(12, 12), ValueError, "latent_dim"),
        ("ppca-guide", "model", lambda: PPCA(12, 2, guide="lowrank"), ValueError, "guide"),
        # -- fit -----------------------------------------------------------------------------
        ("fit-not-a-model", "fit", lambda: fit(object(), X, num_epochs=1), TypeError,
         "Pyro model.*autoencoder"),
        ("fit-epochs-negative", "fit", lambda: fit(vae(), X, num_epochs=-1), ValueError,
         "num_epochs"),
        ("fit-epochs-float", "fit", lambda: fit(vae(), X, num_epochs=1.5), TypeError,
         "num_epochs"),
        ("fit-batch-0", "fit", lambda: fit(vae(), X, num_epochs=1, batch_size=0), ValueError,
         "batch_size"),
        ("fit-lr-negative", "fit", lambda: fit(vae(), X, num_epochs=1, optim=Adam(-1.0)),
         ValueError, "lr"),
        ("fit-lr-nan", "fit", lambda: fit(vae(), X, num_epochs=1, optim=Adam(math.nan)),
         ValueError, "lr"),
        ("fit-lr-decay-0", "fit",
         lambda: fit(vae(), X, num_epochs=1, optim=Adam(1e-3, schedule=ExponentialLR(0.0))),
         ValueError, "gamma"),
        ("fit-beta-negative", "fit",
         lambda: fit(vae(), X, num_epochs=1, loss=ReparamELBO(beta=-1.0)), ValueError, "beta"),
        ("fit-beta-nan", "fit",
         lambda: fit(vae(), X, num_epochs=1, loss=ReparamELBO(beta=math.nan)), ValueError,
         "beta"),
        ("fit-estimator", "fit", lambda: fit(vae(), X, num_epochs=1, estimator="wake-sleep"),
         TypeError, "estimator=: it moved to the loss"),
        ("fit-particles-0", "fit",
         lambda: fit(vae(), X, num_epochs=1, loss=ReparamELBO(num_particles=0)), ValueError,
         "num_particles"),
        ("fit-baseline-reparam", "fit",
         lambda: fit(vae(), X, num_epochs=1, loss=ReparamELBO(baseline="average")), TypeError,
         "baseline"),
        ("fit-loss-object", "fit", lambda: fit(vae(), X, num_epochs=1, loss="iwae"), TypeError,
         "loss must be a pvae loss"),
        ("fit-binarize-static", "fit", lambda: fit(vae(), X, num_epochs=1, binarize="static"),
         ValueError, "binarize"),
        ("fit-resume-no-dir", "fit", lambda: fit(vae(), X, num_epochs=1, resume=True),
         ValueError, "checkpoint_dir"),
        ("fit-seed-str", "fit", lambda: fit(vae(), X, num_epochs=1, seed="abc"), TypeError,
         "seed"),
        ("fit-x-nan", "fit", lambda: fit(vae(), torch.full((4, 12), math.nan), num_epochs=1),
         ValueError, "NaN"),
        ("fit-x-empty", "fit", lambda: fit(vae(), torch.zeros(0, 12), num_epochs=1),
         ValueError, "empty"),
        ("fit-x-width", "fit", lambda: fit(vae(), torch.ones(4, 3), num_epochs=1), ValueError,
         r"shape \(batch, 12\)"),
        ("fit-dataset-empty", "fit", lambda: fit(vae(), TensorDataset(torch.zeros(0, 12)),
                                                 num_epochs=1), ValueError, "empty"),
        ("fit-x-list", "fit", lambda: fit(vae(), [[0.0] * 12], num_epochs=1), TypeError,
         "x_train"),
        ("fit-splits", "fit", lambda: fit(VAE(64, 2), data.load("digits"), num_epochs=1),
         TypeError, "x_train"),
        ("fit-c-length", "fit",
         lambda: fit(CVAE(12, 2, num_classes=3), X, torch.zeros(3, dtype=torch.long),
                     num_epochs=1), ValueError, "c has 3 rows"),
        ("fit-labels-range", "fit",
         lambda: fit(CVAE(12, 2, num_classes=3), X, torch.full((32,), 5), num_epochs=1),
         ValueError, "class labels"),
        ("fit-dataset-range", "fit",
         lambda: fit(vae(), TensorDataset(X + 1.0), num_epochs=1, binarize="dynamic"),
         ValueError, r"\[0, 1\]"),
        ("fit-dataset-nan", "fit",
         lambda: fit(vae(), TensorDataset(torch.where(torch.arange(32).unsqueeze(-1) == 3,
                                                      math.nan, X)), num_epochs=1),
         ValueError, "NaN"),
        ("fit-no-parameters", "fit", lambda: fit(NoParams(), X, num_epochs=1), ValueError,
         "trainable parameters"),
        ("fit-finite-blow-up", "fit",
         lambda: fit(VAE(12, 2, (8,), likelihood="gaussian"), torch.randn(256, 12), num_epochs=30,
                     optim=Adam(10.0), progress=False), FloatingPointError, "loss"),
        ("fit-step", "fit", lambda: fit(vae(), X, num_epochs=1, step="yes"),
         ValueError, "step"),
        # -- evaluation ----------------------------------------------------------------------
        ("iw-samples-0", "evaluate", lambda: iw_log_likelihood(vae(), X, num_samples=0),
         ValueError, "num_samples"),
        ("iw-samples-negative", "evaluate",
         lambda: iw_log_likelihood(vae(), X, num_samples=-3), ValueError, "num_samples"),
        ("iw-batch-0", "evaluate",
         lambda: iw_log_likelihood(vae(), X, num_samples=5, batch_size=0), ValueError,
         "batch_size"),
        ("iw-x-nan", "evaluate",
         lambda: iw_log_likelihood(vae(), torch.full((4, 12), math.nan), num_samples=5),
         ValueError, "NaN"),
        ("iw-x-empty", "evaluate", lambda: iw_log_likelihood(vae(), torch.zeros(0, 12)),
         ValueError, "N >= 1"),
        ("iw-x-list", "evaluate", lambda: iw_log_likelihood(vae(), [[0.0] * 12]), TypeError,
         "x must be"),
        ("iw-guide-misses-site", "evaluate",
         lambda: iw_log_likelihood(GuideMissesASite(), X, num_samples=5), ValueError, "'w'"),
        ("elbo-guide-misses-site", "evaluate", lambda: elbo_terms(GuideMissesASite(), X),
         ValueError, "'w'"),
        ("elbo-samples-0", "evaluate", lambda: elbo_terms(vae(), X, num_samples=0), ValueError,
         "num_samples"),
        ("iw-c-length", "evaluate",
         lambda: iw_log_likelihood(CVAE(12, 2, num_classes=3), X,
                                   c=torch.zeros(3, dtype=torch.long), num_samples=5),
         ValueError, "c has 3 rows"),
        # -- impute --------------------------------------------------------------------------
        ("impute-samples-0", "impute",
         lambda: impute(vae(), X, torch.ones_like(X, dtype=torch.bool), num_samples=0),
         ValueError, "num_samples"),
        ("impute-gibbs-negative", "impute",
         lambda: impute(vae(), X, torch.ones_like(X, dtype=torch.bool), num_gibbs=-1),
         ValueError, "num_gibbs"),
        ("impute-prior-fraction", "impute",
         lambda: impute(vae(), X, torch.ones_like(X, dtype=torch.bool), prior_fraction=2.0),
         ValueError, "prior_fraction"),
        ("impute-mask-shape", "impute",
         lambda: impute(vae(), X, torch.ones(3, 12, dtype=torch.bool)), ValueError, "mask"),
        ("impute-joint-likelihood", "impute",
         lambda: impute(JointGaussianLikelihood(), X, torch.ones_like(X, dtype=torch.bool)),
         ValueError, "factorizes over"),
        # -- posterior comparison ------------------------------------------------------------
        ("compare-vae", "posterior", lambda: compare_posteriors(vae(), X), TypeError,
         "exact_posterior"),
        ("compare-nan", "posterior",
         lambda: compare_posteriors(PPCA(12, 2), torch.full((4, 12), math.nan)), ValueError,
         "NaN"),
        ("compare-empty", "posterior", lambda: compare_posteriors(PPCA(12, 2), torch.zeros(0, 12)),
         ValueError, "x"),
        ("compare-vae-reference", "posterior",
         lambda: compare_posteriors(PPCA(12, 2), X, reference=vae()), TypeError, "reference"),
        # -- data ----------------------------------------------------------------------------
        ("load-unknown", "data", lambda: data.load("cifar"), ValueError, "unknown dataset"),
        ("load-binarize", "data", lambda: data.load("digits", binarize="sometimes"),
         ValueError, "binarize"),
        ("binarize-nan", "data", lambda: data.binarize(torch.tensor([0.5, math.nan])),
         ValueError, "NaN"),
        ("data-dir-file", "data",
         lambda: data.load("mnist", data_dir=_a_file(tmp)), ValueError, "data_dir"),
        ("idx-truncated", "data", lambda: data.read_idx(_truncated_idx(tmp)), data.IDXError,
         "truncated"),
        ("idx-test-size", "data", lambda: data.load("mnist", data_dir=_mixed_sizes(tmp)),
         data.IDXError, "test images"),
        ("condition-unknown", "data", lambda: data.condition_mask((8, 8), "diagonal"),
         ValueError, "condition"),
        # -- command line --------------------------------------------------------------------
        ("cli-num-train-negative", "cli", lambda: cli([*train, "--num-train", "-5", "--out", out]),
         2, "num-train"),
        ("cli-num-val-negative", "cli", lambda: cli([*train, "--num-val", "-1", "--out", out]),
         2, "num-val"),
        ("cli-latent-0", "cli", lambda: cli([*train, "--latent-dim", "0", "--out", out]), 2,
         "latent"),
        ("cli-beta-negative", "cli", lambda: cli([*train, "--beta", "-1", "--out", out]), 2,
         "beta"),
        ("cli-lr-0", "cli", lambda: cli([*train, "--lr", "0", "--out", out]), 2, "lr"),
        ("cli-out-is-file", "cli", lambda: cli([*train, "--out", _a_file(tmp)]), 2, "--out"),
        ("cli-out-under-file", "cli", lambda: cli([*train, "--out", _a_file(tmp) + "/run"]), 2,
         "--out"),
        ("cli-resume-nothing", "cli",
         lambda: cli([*train, "--resume", "--out", str(tmp / "never")]), 2, "resume"),
        ("cli-evaluate-missing", "cli", lambda: cli(["evaluate", str(tmp / "nowhere")]), 2,
         "config.json"),
        ("cli-config-list", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "list", lambda r: _write(
             r / "config.json", "[1, 2]")))]), 2, "config.json"),
        ("cli-config-garbage", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "garbage", lambda r: _write(
             r / "config.json", "\x00\x01 not json")))]), 2, "config.json"),
        ("cli-config-missing-key", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "nokey", lambda r: _write(
             r / "config.json", json.dumps({k: v for k, v in json.loads(
                 (r / "config.json").read_text()).items() if k != "dataset"}))))]), 2,
         "dataset"),
        ("cli-config-other-seed", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "seed", lambda r: _write(
             r / "config.json", json.dumps({**json.loads((r / "config.json").read_text()),
                                            "seed": 7}))))]), 2, "seed"),
        ("cli-checkpoint-no-epoch", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "noepoch", lambda r: _checkpoint(
             r, lambda s: s.pop("epoch"))))]), 2, "epoch"),
        ("cli-checkpoint-model-not-dict", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "notdict", lambda r: _checkpoint(
             r, lambda s: s.update(model=[1, 2]))))]), 2, "model"),
        ("cli-checkpoint-nan", "cli",
         lambda: cli(["evaluate", str(edited_run(tmp, "nan", lambda r: _checkpoint(
             r, _nan_weights)))]), 2, "NaN"),
        ("cli-evaluate-num-test-negative", "cli",
         lambda: cli(["evaluate", str(digits_run(tmp)), "--num-test", "-5"]), 2, "num-test"),
        ("cli-evaluate-samples-negative", "cli",
         lambda: cli(["evaluate", str(digits_run(tmp)), "--num-samples", "-3"]), 2,
         "num-samples"),
        ("cli-ppca-existing", "cli",
         lambda: cli(["ppca", "--out", str(digits_run(tmp)), "--num-epochs", "1",
                      "--no-progress"]), 2, "already holds a run"),
        ("cli-likelihood-scale", "cli",
         lambda: cli([*train, "--likelihood", "gaussian", "--likelihood-scale", "big", "--out",
                      out]), 2, "likelihood-scale"),
        *run_folder_cases(tmp, train),
        *watch_and_steer_cases(tmp, train),
    ]


def _a_file(tmp):
    path = tmp / "a-file"
    path.write_text("not a folder")
    return str(path)


def _idx(path, array):
    kinds = {np.dtype(np.uint8): 8}
    header = bytes([0, 0, kinds[array.dtype], array.ndim])
    with gzip.open(path, "wb") as f:
        f.write(header + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes())


def _mixed_sizes(tmp):
    """MNIST-named IDX files whose test images (5x5) differ from the training images (4x4)."""
    folder = tmp / "mixed"
    folder.mkdir(exist_ok=True)
    _idx(folder / "train-images-idx3-ubyte.gz", np.zeros((3, 4, 4), np.uint8))
    _idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    _idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((2, 5, 5), np.uint8))
    _idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    return folder


def _truncated_idx(tmp):
    path = tmp / "t10k-labels-idx1-ubyte.gz"
    raw = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(np.arange(5, dtype=np.uint8))
    with gzip.open(path, "wb") as f:
        f.write(raw)
    return path


def classify(case) -> str:
    """``clear`` (the expected error, naming what is wrong), ``handled`` (a fault handled
    correctly, without an error where none is due), ``unclear`` (another error, a traceback,
    or a message that does not name it), ``silent`` (no error at all where one is due) or
    ``lost`` (``after`` found a file lost or written where it must not be)."""
    import re

    _, category, call, expected, pattern, *rest = case
    after = rest[0] if rest else None
    verdict = None
    try:
        result = call()
    except Exception as e:  # noqa: BLE001 - classifying any failure (a traceback on the CLI)
        ok = isinstance(expected, type) and isinstance(e, expected) and re.search(pattern, str(e))
        verdict = "clear" if ok else "unclear"
    else:
        if expected is None:
            verdict = "handled"
        elif isinstance(expected, int):  # the command line: (exit code, stderr)
            code, err = result
            one_line = err.strip().startswith("pvae: ") and err.strip().count("\n") == 0
            verdict = ("silent" if code == 0 else
                       "clear" if code == expected and one_line and re.search(pattern, err)
                       else "unclear")
        else:
            verdict = "silent"
    if after is not None:
        try:
            after()
        except Exception:  # noqa: BLE001 - AssertionError, or the file is unreadable
            return "lost"
    return verdict


# ---------------------------------------------------------------------------------------------
# run folders: concurrency, file-system faults, signals, hostile files (issue 28)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s write lock as pvae does (``flock`` on ``.lock``
    with its process id inside), until it is terminated."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def while_held(folder: Path, call, plant_temp: bool = False):
    """``call()`` while another process holds ``folder``'s lock; with ``plant_temp``, that
    process has a temporary checkpoint in progress, which ``call`` must not delete."""
    holder = _holder(folder)
    try:
        if plant_temp:
            (folder / ".checkpoint.pt.live0000.tmp").write_bytes(b"being written")
        return call()
    finally:
        holder.terminate()
        holder.communicate()


def _planted_link(tmp, name, link, target_is_folder=False):
    """A copy of the digits run with ``link`` (a path inside it) a symbolic link to a file
    (or folder) outside it; returns ``(run, target)``."""
    target = tmp / f"{name}-outside"
    if target_is_folder:
        target.mkdir(exist_ok=True)
    else:
        target.write_text("precious")

    def plant(run):
        (run / link).parent.mkdir(parents=True, exist_ok=True)
        if (run / link).is_dir() and not (run / link).is_symlink():
            shutil.rmtree(run / link)
        elif (run / link).exists():
            (run / link).unlink()
        (run / link).symlink_to(target)

    return edited_run(tmp, name, plant), target


def untouched(target: Path):
    """An ``after`` check: the file is still ``precious`` (or the folder still empty)."""
    def check():
        if target.is_dir():
            assert not list(target.iterdir()), f"{target} was written into"
        else:
            assert target.read_text() == "precious", f"{target} was overwritten"
    return check


def link_case(tmp, train, case_id, link, command, folder=False):
    """A run folder with ``link`` pointing out of it; ``command`` is ``evaluate`` or
    ``resume``."""
    run, target = None, tmp / f"{case_id}-outside"

    def call():
        nonlocal run
        run, _ = _planted_link(tmp, case_id, link, folder)
        if command == "evaluate":
            return cli(["evaluate", str(run), "--num-samples", "0"])
        return cli([*train, "--num-epochs", "2", "--resume", "--out", str(run)])

    return (case_id, "hostile-files", call, 2, "symbolic link", untouched(target))


def _raising(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@contextlib.contextmanager
def patched(obj, name, value):
    """``obj.name = value`` for the block (the catalogue runs without pytest's monkeypatch)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _full_disk_at_second_save(tmp, train):
    """``pvae train`` for 3 epochs whose second checkpoint hits a full disk (as torch.save
    reports it: a RuntimeError raised from the OSError); without validation data, so that no
    best.pt is saved in between."""
    import pvae.train.checkpoint as checkpoint

    out, calls, real_save = tmp / "enospc", [], torch.save

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from \
                OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    shutil.rmtree(out, ignore_errors=True)
    with patched(checkpoint.torch, "save", save):
        return cli([*train, "--num-epochs", "3", "--num-val", "0", "--out", str(out)])


def _train_failing_history(tmp, train):
    """``pvae train`` whose ``history.csv`` (rewritten every epoch) cannot be written from the
    second epoch on (no permission): the first epoch's checkpoint stays."""
    out = tmp / "eacces-train"
    shutil.rmtree(out, ignore_errors=True)
    with _fails_to_write("history.csv", errno.EACCES, after=1):
        return cli([*train, "--num-epochs", "3", "--out", str(out)])


def nothing_in_cwd(before: set):
    """An ``after`` check: no file appeared in the current folder."""
    def check():
        assert set(os.listdir()) <= before, set(os.listdir()) - before
    return check


def checkpoint_at(folder: Path, epoch: int):
    """An ``after`` check: ``folder`` holds a whole checkpoint of ``epoch`` and no temporary
    files."""
    def check():
        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == epoch, state["epoch"]
        assert not list(folder.glob(".*.tmp")), list(folder.glob(".*.tmp"))
    return check


def _fails_to_write(name, code, after=0):
    """``pvae.files``'s temporary file cannot be created for ``name`` (errno ``code``), once
    ``after`` writes of it went through."""
    import pvae.files as files

    real, written = files._open_temp, []

    def open_temp(folder, target):
        if target == name:
            if len(written) >= after:
                raise OSError(code, os.strerror(code), str(folder / target))
            written.append(target)
        return real(folder, target)

    return patched(files, "_open_temp", open_temp)


def _evaluate_with(tmp, name, context, edit=None):
    run = edited_run(tmp, name, edit or (lambda r: None))
    with context:
        return cli(["evaluate", str(run), "--num-samples", "0"])


def metrics_written(tmp, name):
    def check():
        metrics = json.loads((tmp / name / "metrics.json").read_text())
        assert "test_elbo" in metrics
    return check


class DeletesFolder(TensorDataset):
    """Training data that, once the first checkpoint is in ``folder``, deletes the folder
    (or, with ``replace``, puts an empty folder of the same name in its place)."""

    def __init__(self, x, folder: Path, replace: bool = False):
        super().__init__(x)
        self.folder, self.replace = folder, replace

    def __getitem__(self, i):
        if (self.folder / "checkpoint.pt").is_file():
            shutil.rmtree(self.folder)
            if self.replace:
                self.folder.mkdir()
        return super().__getitem__(i)


def _fit_losing_folder(tmp, name, replace=False):
    folder = tmp / name
    shutil.rmtree(folder, ignore_errors=True)
    fit(vae(), DeletesFolder(X, folder, replace), num_epochs=3, batch_size=16,
        checkpoint_dir=folder, progress=False)


def nothing_written(folder: Path, replaced=False):
    def check():
        if replaced:
            assert folder.is_dir() and not list(folder.iterdir()), list(folder.iterdir())
        else:
            assert not folder.exists(), f"{folder} was recreated"
    return check


def _sigterm_in_save(tmp, train):
    """SIGTERM (as ``timeout`` or Slurm send it) while the second checkpoint is being
    written (without validation data: no best.pt saved in between)."""
    import pvae.train.checkpoint as checkpoint

    out, calls, real_save = tmp / "sigterm", [], torch.save

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, f)

    shutil.rmtree(out, ignore_errors=True)
    with patched(checkpoint.torch, "save", save):
        return cli([*train, "--num-epochs", "4", "--num-val", "0", "--out", str(out)])


def _ctrl_c_in_evaluate(tmp):
    import pvae.cli.evaluate as evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with patched(evaluate, "elbo_terms", interrupted):
        return cli(["evaluate", str(digits_run(tmp)), "--num-samples", "0"])


def _killed_while_writing_figure(tmp):
    """A process killed by SIGKILL after a figure's bytes are written but before the rename
    (the moment that used to leave a truncated PNG)."""
    folder = tmp / "killed-figure"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "old.png").write_bytes(b"the previous figure")
    code = ("import os, signal, sys\n"
            "from pvae import files\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
            "files.write_bytes(sys.argv[1], b'\\x89PNG half of a new figure')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder / "old.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def figure_intact(tmp):
    def check():
        folder = tmp / "killed-figure"
        assert (folder / "old.png").read_bytes() == b"the previous figure"
        assert [p.name for p in folder.glob(".old.png.*.tmp")], "no temporary file was used"
        from pvae.files import folder_lock
        with folder_lock(folder):  # the next writer removes what the killed one left
            pass
        assert not list(folder.glob(".*.tmp"))
    return check


def _gzip_bomb(tmp):
    """A small gzip file whose IDX header announces 10 images of 28 x 28 followed by 64 MB of
    zeros: read as the header says, it is refused after 7,841 bytes, not inflated whole."""
    path = tmp / "bomb-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(64):
            f.write(zeros)
    return path


def _idx_header(tmp, name, shape):
    path = tmp / name
    path.write_bytes(bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
                     + bytes(16))
    return path


def _edit_config(run, change):
    """``change(config)`` applied alike to config.json and to the checkpoint's settings (a
    folder crafted to pass the agreement check)."""
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))
    _checkpoint(run, lambda state: change(state["config"]))


def _received(tmp):
    """A received run whose config asks for a download of MNIST into a folder outside it."""
    outside = tmp / "received-elsewhere" / "mnist"

    def edit(run):
        _edit_config(run, lambda c: c.update(dataset="mnist", download=True,
                                             data_dir=str(outside)))

    run = edited_run(tmp, "received", edit)
    env = os.environ.pop("PVAE_DATA_DIR", None)
    try:
        return cli(["evaluate", str(run), "--num-samples", "0"])
    finally:
        if env is not None:
            os.environ["PVAE_DATA_DIR"] = env


def no_download(tmp):
    def check():
        assert not (tmp / "received-elsewhere").exists(), "a folder was created outside the run"
    return check


def _repaired(tmp):
    """``pvae repair`` on a run that lost config.json and history.csv."""
    def edit(run):
        (run / "config.json").unlink()
        (run / "history.csv").unlink(missing_ok=True)

    run = edited_run(tmp, "lost-config", edit)
    code, err = cli(["repair", str(run)])
    assert code == 0, err
    from pvae.runs import load_run
    load_run(run, device="cpu")
    assert (run / "history.csv").is_file()


def _writers_race(tmp):
    """Eight threads rewriting one JSON file at once (the old fixed temporary name made
    concurrent writers crash each other)."""
    from pvae.files import write_json

    path, errors = tmp / "race.json", []

    def write(k):
        try:
            for i in range(20):
                write_json(path, {"writer": k, "i": i})
        except Exception as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def race_result(tmp):
    def check():
        assert json.loads((tmp / "race.json").read_text())["i"] == 19
        assert not list(tmp.glob(".race.json.*.tmp"))
    return check


def _file_bytes(path: Path):
    """An ``after`` check: ``path`` holds the bytes it had when the case was built."""
    before = {}

    def snapshot():
        before["bytes"] = path.read_bytes()

    def check():
        assert path.read_bytes() == before["bytes"], f"{path} changed"
    return snapshot, check


def run_folder_cases(tmp, train):
    """The cases of issue 28: run folders shared and written safely."""
    out = str(tmp / "cli-out")
    held = tmp / "held"
    other = tmp / "other-run"
    snapshot, unchanged = _file_bytes(other / "checkpoint.pt")

    def other_run_fit():
        if not other.exists():
            shutil.copytree(digits_run(tmp), other)
        snapshot()
        fit(VAE(64, 2, (8,)), torch.rand(16, 64).bernoulli(), num_epochs=1,
            checkpoint_dir=other, progress=False)

    return [
        # -- concurrency ---------------------------------------------------------------------
        ("two-trains-one-out", "concurrency",
         lambda: while_held(held, lambda: cli([*train, "--out", str(held)]), plant_temp=True),
         2, r"run .*held is in use by process \d+",
         lambda: (held / ".checkpoint.pt.live0000.tmp").read_bytes()),
        ("evaluate-while-training", "concurrency",
         lambda: while_held(digits_run(tmp), lambda: cli(["evaluate", str(digits_run(tmp)),
                                                          "--num-samples", "0"])),
         2, r"in use by process \d+"),
        ("fit-while-held", "concurrency",
         lambda: while_held(held, lambda: fit(vae(), X, num_epochs=1, checkpoint_dir=held,
                                              progress=False)),
         RuntimeError, r"in use by process \d+"),
        ("fit-into-another-run", "concurrency", other_run_fit, ValueError,
         "already holds a run's checkpoint.*resume=True", unchanged),
        ("json-writers-race", "concurrency", lambda: _writers_race(tmp), None, "",
         race_result(tmp)),
        # -- file-system faults --------------------------------------------------------------
        ("full-disk-at-checkpoint", "filesystem", lambda: _full_disk_at_second_save(tmp, train),
         1, r"cannot write .*checkpoint.pt: No space left on device; the last good checkpoint "
            r"is epoch 1", checkpoint_at(tmp / "enospc", 1)),
        ("read-only-metrics", "filesystem",
         lambda: _evaluate_with(tmp, "rofs", _fails_to_write("metrics.json", errno.EROFS)),
         1, r"cannot write .*metrics.json: Read-only file system"),
        ("no-permission-figure", "filesystem",
         lambda: _evaluate_with(tmp, "eacces", _fails_to_write("samples.png", errno.EACCES)),
         1, r"cannot write .*samples.png: Permission denied; .*metrics.json is written",
         metrics_written(tmp, "eacces")),
        ("no-permission-history", "filesystem", lambda: _train_failing_history(tmp, train), 1,
         r"cannot write .*history.csv: Permission denied", checkpoint_at(tmp / "eacces-train", 1)),
        ("figures-is-a-file", "filesystem",
         lambda: _evaluate_with(tmp, "figfile", contextlib.nullcontext(),
                                lambda r: (shutil.rmtree(r / "figures", ignore_errors=True),
                                           (r / "figures").write_text("a file"))),
         1, r"cannot write .*figures.* is a file", metrics_written(tmp, "figfile")),
        ("full-disk-at-figure", "filesystem",
         lambda: _evaluate_with(tmp, "figfull", _fails_to_write("reconstructions.png",
                                                                errno.ENOSPC)),
         1, r"reconstructions.png: No space left on device; .*metrics.json is written",
         metrics_written(tmp, "figfull")),
        ("out-name-too-long", "filesystem",
         lambda: cli([*train, "--out", str(tmp / ("a" * 300))]), 2,
         r"--out .* cannot be used \(File name too long\)"),
        ("out-empty", "filesystem", lambda: cli([*train, "--out", ""]), 2, "--out is empty",
         nothing_in_cwd(set(os.listdir()))),
        ("folder-deleted-in-training", "filesystem",
         lambda: _fit_losing_folder(tmp, "deleted"), OSError,
         "was deleted or moved away while this process was writing it",
         nothing_written(tmp / "deleted")),
        ("folder-replaced-in-training", "filesystem",
         lambda: _fit_losing_folder(tmp, "replaced", replace=True), OSError,
         "was replaced by another folder", nothing_written(tmp / "replaced", replaced=True)),
        ("config-lost", "filesystem",
         lambda: cli(["evaluate", str(edited_run(tmp, "noconfig", lambda r: (
             r / "config.json").unlink()))]), 2, r"config.json not found.*pvae repair"),
        ("config-rebuilt-from-checkpoint", "filesystem", lambda: _repaired(tmp), None, ""),
        # -- signals -------------------------------------------------------------------------
        ("sigterm-during-checkpoint", "signals", lambda: _sigterm_in_save(tmp, train), 143,
         r"terminated \(SIGTERM\); the last checkpoint \(epoch 2\) is intact: continue with "
         "--resume", checkpoint_at(tmp / "sigterm", 2)),
        ("ctrl-c-in-evaluate", "signals", lambda: _ctrl_c_in_evaluate(tmp), 130,
         r"^(?!.*--resume)pvae: interrupted; .*run pvae evaluate again"),
        ("sigkill-while-writing-figure", "signals", lambda: _killed_while_writing_figure(tmp),
         None, "", figure_intact(tmp)),
        ("out-of-memory-in-evaluate", "hostile-files",
         lambda: _evaluate_with(tmp, "oom", patched(
             __import__("pvae.cli.evaluate", fromlist=["x"]), "elbo_terms", _raising(
                 RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                              "allocate memory: you tried to allocate 919 GB"))))
         , 1, r"out of memory .*--num-elbo-samples"),
        # -- hostile files -------------------------------------------------------------------
        link_case(tmp, train, "link-metrics-tmp", ".metrics.json.tmp", "evaluate"),
        link_case(tmp, train, "link-config-tmp", ".config.json.tmp", "resume"),
        link_case(tmp, train, "link-history-tmp", "history.csv.tmp", "resume"),
        link_case(tmp, train, "link-metrics", "metrics.json", "evaluate"),
        link_case(tmp, train, "link-figure", "figures/samples.png", "evaluate"),
        link_case(tmp, train, "link-figures-folder", "figures", "evaluate", folder=True),
        ("received-run-downloads", "hostile-files", lambda: _received(tmp), 2,
         r"mnist: the IDX files .* were not found", no_download(tmp)),
        ("gzip-bomb", "hostile-files", lambda: data.read_idx(_gzip_bomb(tmp)), data.IDXError,
         r"more than 7856 bytes"),
        ("idx-header-too-large", "hostile-files",
         lambda: data.read_idx(_idx_header(tmp, "huge-idx3-ubyte", (60000, 100000, 100000))),
         data.IDXError, "more than max_bytes"),
        ("idx-header-int64-overflow", "hostile-files",
         lambda: data.read_idx(_idx_header(tmp, "overflow-idx4-ubyte", (2**32 - 1,) * 4)), data.IDXError,
         "more than max_bytes"),
        ("config-nested-100000", "hostile-files",
         lambda: cli(["evaluate", str(edited_run(tmp, "deep", lambda r: _write(
             r / "config.json", "[" * 100_000 + "]" * 100_000)))]), 2, "nests deeper than"),
        ("config-huge-hidden", "hostile-files",
         lambda: cli(["evaluate", str(edited_run(tmp, "huge", lambda r: _edit_config(
             r, lambda c: c["model_config"].update(hidden_dims=[20000, 20000])))),
             "--num-samples", "0"]), 2, r"does not fit the model .*\(8, 64\) in the checkpoint"),
        ("config-latent-1e9", "hostile-files",
         lambda: cli(["evaluate", str(edited_run(tmp, "widelatent", lambda r: _edit_config(
             r, lambda c: c["model_config"].update(latent_dim=10**9)))), "--num-samples", "0"]),
         2, "does not fit the model"),
        ("cli-latent-1e9", "hostile-files",
         lambda: cli([*train, "--latent-dim", str(10**9), "--hidden-dims", "400", "--out", out]),
         2, r"parameters .* more than the .* available"),
        ("cli-latent-beyond-int64", "hostile-files",
         lambda: cli([*train, "--latent-dim", str(10**20), "--out", out]), 2, r"2\*\*63"),
        # -- API -----------------------------------------------------------------------------
        ("fit-checkpoint-dir-empty", "api",
         lambda: fit(vae(), X, num_epochs=1, checkpoint_dir="", progress=False), ValueError,
         "checkpoint_dir is an empty string"),
        ("vae-latent-beyond-int64", "api", lambda: VAE(12, 10**20), ValueError,
         r"latent_dim must be at most 2\*\*63 - 1"),
        ("vae-layer-beyond-int64", "api", lambda: VAE(12, 2**60), ValueError,
         "more than a torch tensor can hold"),
    ]


# ---------------------------------------------------------------------------------------------
# watching and steering runs: flags, your own data, config files, run formats (issue 29)


def _without_module(name, call):
    """``call()`` as if the module ``name`` were not installed."""
    saved = sys.modules.get(name)
    sys.modules[name] = None  # (import raises ImportError)
    try:
        return call()
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def _own(tmp, name, write):
    """A file (or folder) of your own data under ``tmp/own``, written by ``write(path)``."""
    path = tmp / "own" / name
    if path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return str(path)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _half(raw: bytes):
    return lambda path: path.write_bytes(raw[: len(raw) // 2])


def _npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def _pt(obj):
    return lambda path: torch.save(obj, path)


def _saved(array, **kwargs):
    return lambda path: np.save(path, array, **kwargs)


def _png_bytes(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pngs(layout: dict):
    """A folder of PNGs: ``{relative path: pixels, bytes or None (a folder)}``."""
    def write(folder):
        folder.mkdir(parents=True)
        for name, content in layout.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if content is None:
                target.mkdir(exist_ok=True)
            else:
                target.write_bytes(content if isinstance(content, bytes) else _png_bytes(content))
    return write


GREY = np.arange(64, dtype=np.uint8).reshape(8, 8)
RGB = np.stack([GREY] * 3, -1)
TRUNCATED_PNG = _png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))


def _own_run(tmp):
    """A trained 1-epoch run on an .npz of your own (made once per folder)."""
    run = tmp / "own-run"
    if not (run / "checkpoint.pt").exists():
        path = tmp / "own-data.npz"
        np.savez(path, x=np.random.default_rng(0).random((60, 16), dtype=np.float32))
        main(["train", "--data-file", str(path), "--latent-dim", "2", "--hidden-dims", "8",
              "--num-epochs", "1", "--num-val", "10", "--no-progress", "--out", str(run)])
    return run


def _received_own(tmp, name, change):
    """The run on your own data, copied, with its data file changed by ``change(path)``."""
    run = _own_run(tmp)
    config = json.loads((run / "config.json").read_text())
    copy = tmp / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    saved = Path(config["data_file"]).read_bytes()
    change(Path(config["data_file"]))
    try:
        return cli(["evaluate", str(copy), "--num-samples", "0"])
    finally:
        Path(config["data_file"]).write_bytes(saved)


def _config_file(tmp, name, text):
    path = tmp / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _record(tmp, name, change):
    """A run's own config.json (the digits run's), changed by ``change(record)``."""
    record = json.loads((digits_run(tmp) / "config.json").read_text())
    change(record)
    return _config_file(tmp, name, json.dumps(record))


def _format(value, pvae="9.9.9"):
    return lambda c: c.update(format=value, versions={**c.get("versions", {}), "pvae": pvae})


def watch_and_steer_cases(tmp, train):
    """The cases of issue 29: flags, your own data, config files, run formats."""
    out = str(tmp / "cli-out")
    t = [*train, "--out", out]
    # without the data and sizes of ``train``: for your own data, for model-specific sizes
    o = [a for a in t if a not in ("--dataset", "digits")]
    d = ["train", "--dataset", "digits", "--no-progress", "--out", out]

    def own(name, write, *flags, pattern, expected=2):
        return (f"data-file-{name}", "own-data",
                lambda: cli([*o, "--data-file", _own(tmp, name, write), *flags]), expected,
                pattern)

    def folder(name, layout, *flags, pattern):
        return (f"image-folder-{name}", "own-data",
                lambda: cli([*o, "--image-folder", _own(tmp, name, _pngs(layout)), *flags]), 2,
                pattern)

    def config(name, text, pattern, *flags):
        return (f"config-{name}", "config-file",
                lambda: cli(["train", "--config", _config_file(tmp, name, text), *flags,
                             "--out", out]), 2, pattern)

    def record(name, change, pattern):
        return (f"config-record-{name}", "config-file",
                lambda: cli(["train", "--config", _record(tmp, f"{name}.json", change),
                             "--out", out]), 2, pattern)

    x = np.random.default_rng(0).random((20, 6), dtype=np.float32)
    return [
        # -- flags ---------------------------------------------------------------------------
        ("unknown-flag-one-prefix", "flags", lambda: cli([*t, "--latent-dimm", "3"]), 2,
         r"^pvae: unrecognized arguments: --latent-dimm 3$"),
        ("unknown-command", "flags", lambda: cli(["trian"]), 2,
         r"^pvae: argument command: invalid choice: 'trian'"),
        ("out-missing", "flags", lambda: cli(train), 2, "--out is required"),
        ("vae-flag-for-ae", "flags", lambda: cli([*t, "--model", "ae", "--likelihood",
                                                  "gaussian"]), 2,
         r"--likelihood applies to the VAEs \(--model vae, cvae, hvae\), not --model ae"),
        ("estimator-for-ae", "flags", lambda: cli([*t, "--model", "ae", "--estimator", "iwae"]),
         2,
         "--estimator applies to the VAEs"),
        ("ae-flag-for-vae", "flags", lambda: cli([*t, "--sparsity", "l1"]), 2,
         r"--sparsity applies to the autoencoders \(--model ae, linear-ae, mae\), not "
         "--model vae"),
        ("cvae-flag-for-vae", "flags", lambda: cli([*t, "--prior", "learned"]), 2,
         "--prior applies to --model cvae, not --model vae"),
        ("vae-flag-for-hvae", "flags", lambda: cli([*d, "--model", "hvae", "--network",
                                                    "conv"]), 2,
         "--network applies to --model vae, cvae, not --model hvae"),
        ("latent-dim-for-hvae", "flags", lambda: cli([*t, "--model", "hvae", "--latent-dim",
                                                      "3"]), 2,
         "--latent-dim applies to .*not --model hvae"),
        ("hvae-flag-for-vae", "flags", lambda: cli([*t, "--latent-dims", "4", "2"]), 2,
         "--latent-dims applies to --model hvae"),
        ("mae-flag-for-ae", "flags", lambda: cli([*t, "--model", "ae", "--patch-size", "4"]),
         2, "--patch-size applies to --model mae, not --model ae"),
        ("hidden-dims-for-linear-ae", "flags",
         lambda: cli([*t, "--model", "linear-ae", "--hidden-dims", "8"]), 2,
         "--hidden-dims applies to .*not --model linear-ae"),
        ("analytic-kl-for-iwae", "flags",
         lambda: cli([*t, "--estimator", "iwae", "--analytic-kl"]), 2,
         "--analytic-kl applies to --estimator reparam, not iwae"),
        ("gradient-for-reparam", "flags", lambda: cli([*t, "--gradient", "dreg"]), 2,
         "--gradient applies to --estimator iwae, not reparam"),
        ("baseline-for-vimco", "flags",
         lambda: cli([*t, "--estimator", "vimco", "--baseline", "average"]), 2,
         "--baseline applies to --estimator score, not vimco"),
        ("optimizer-unknown", "flags", lambda: cli([*t, "--optimizer", "sgd"]), 2,
         "--optimizer: invalid choice: 'sgd'"),
        ("lr-schedule-unknown", "flags", lambda: cli([*t, "--lr-schedule", "linear"]), 2,
         "--lr-schedule: invalid choice"),
        ("exponential-without-decay", "flags",
         lambda: cli([*t, "--lr-schedule", "exponential"]), 2,
         "--lr-schedule exponential needs --lr-decay"),
        ("lr-decay-0", "flags", lambda: cli([*t, "--lr-schedule", "exponential", "--lr-decay",
                                             "0"]), 2, "--lr-decay: must be a finite number > 0"),
        ("step-decay-above-1", "flags",
         lambda: cli([*t, "--lr-schedule", "step", "--lr-step-size", "2", "--lr-decay", "2"]),
         2, r"--lr-schedule step: --lr-decay \(its gamma\) must be .*<= 1, got 2.0"),
        ("plateau-factor-1", "flags",
         lambda: cli([*t, "--lr-schedule", "plateau", "--lr-decay", "1"]), 2,
         r"--lr-decay \(its factor\) must lie in \(0, 1\)"),
        ("warmup-without-cosine", "flags", lambda: cli([*t, "--warmup-steps", "10"]), 2,
         "--warmup-steps applies to --lr-schedule cosine .the learning rate is constant"),
        ("step-size-for-cosine", "flags",
         lambda: cli([*t, "--lr-schedule", "cosine", "--lr-step-size", "2"]), 2,
         "--lr-step-size applies to --lr-schedule step, not cosine"),
        ("plateau-patience-for-step", "flags",
         lambda: cli([*t, "--lr-schedule", "step", "--lr-step-size", "2",
                      "--plateau-patience", "1"]), 2,
         "--plateau-patience applies to --lr-schedule plateau, not step"),
        ("decay-for-constant", "flags",
         lambda: cli([*t, "--lr-schedule", "constant", "--lr-decay", "0.5"]), 2,
         "--lr-decay applies to --lr-schedule exponential, step, plateau, not constant"),
        ("min-lr-negative", "flags", lambda: cli([*t, "--lr-schedule", "cosine", "--min-lr",
                                                  "-1"]), 2, "--min-lr: must be a finite number"),
        ("clip-norm-0", "flags", lambda: cli([*t, "--clip-norm", "0"]), 2,
         "--clip-norm: must be a finite number > 0"),
        ("weight-decay-nan", "flags", lambda: cli([*t, "--weight-decay", "nan"]), 2,
         "--weight-decay: must be a finite number"),
        ("early-stopping-0", "flags", lambda: cli([*t, "--early-stopping", "0"]), 2,
         "--early-stopping: must be an integer >= 1"),
        ("min-delta-alone", "flags", lambda: cli([*t, "--min-delta", "0.1"]), 2,
         "--min-delta applies to --early-stopping PATIENCE"),
        ("min-delta-negative", "flags",
         lambda: cli([*t, "--early-stopping", "2", "--min-delta", "-1"]), 2,
         "--min-delta: must be a finite number >= 0"),
        ("logger-unknown", "flags", lambda: cli([*t, "--logger", "wandb"]), 2,
         "--logger: invalid choice: 'wandb'"),
        ("logger-not-installed", "flags", lambda: _without_module(
            "torch.utils.tensorboard", lambda: cli([*t, "--logger", "tensorboard"])), 2,
         r"this logger needs the tensorboard package: pip install 'pvae-ppl\[tensorboard\]'"),
        ("evaluate-checkpoint-unknown", "flags",
         lambda: cli(["evaluate", str(digits_run(tmp)), "--checkpoint", "first"]), 2,
         "--checkpoint: invalid choice: 'first'"),
        ("evaluate-no-best", "flags",
         lambda: cli(["evaluate", str(edited_run(tmp, "nobest", lambda r: (
             r / "best.pt").unlink())), "--checkpoint", "best"]), 2,
         r"holds no best.pt: the best epoch is kept when a run has validation data"),
        ("evaluate-tsne-negative", "flags",
         lambda: cli(["evaluate", str(digits_run(tmp)), "--tsne-points", "-1"]), 2,
         "--tsne-points: must be an integer >= 0"),
        ("load-run-checkpoint", "api",
         lambda: __import__("pvae").load_run(digits_run(tmp), checkpoint="first"), ValueError,
         "checkpoint must be one of"),
        ("embedding-one-point", "api",
         lambda: __import__("pvae.plots", fromlist=["x"]).latent_embedding(torch.zeros(1, 2)),
         ValueError, "N >= 2"),
        # -- your own data -------------------------------------------------------------------
        own("truncated.npy", _half(_npy_bytes(x)), pattern=r"truncated.npy is truncated"),
        own("truncated.npz", lambda p: (np.savez_compressed(p, x=x),
                                        _half(p.read_bytes())(p)),
            pattern=r"truncated.npz is not a valid .npz file .*it may be truncated"),
        own("truncated.pt", lambda p: (torch.save(torch.from_numpy(x), p),
                                       _half(p.read_bytes())(p)),
            pattern="truncated.pt is not a .pt file written by torch.save, or it is truncated"),
        own("objects.npy", _saved(np.array([{}, {}], dtype=object), allow_pickle=True),
            pattern=r"holds Python objects \(dtype object\), which pvae does not unpickle"),
        own("strings.npy", _saved(np.array([["a", "b"], ["c", "d"]])),
            pattern=r"x has dtype <U1; pvae reads real numbers"),
        own("complex.npy", _saved(x.astype(np.complex64)),
            pattern="x has dtype complex64; pvae reads real numbers"),
        own("nan.npy", _saved(np.where(np.arange(6) == 2, np.nan, x)),
            pattern=r"holds 20 NaN or infinite value\(s\), the first in row 0"),
        own("huge.npy", _saved(np.full((4, 6), 1e300)),
            pattern="beyond float32's range count as infinite"),
        own("flat.npy", _saved(x[:, 0]), pattern=r"x has shape \(20,\); pvae reads one datapoint "
            "per row"),
        own("5d.npy", _saved(np.zeros((2, 1, 1, 1, 1), np.float32)),
            pattern=r"shape \(2, 1, 1, 1, 1\)"),
        own("channels.npy", _saved(np.zeros((2, 5, 4, 4), np.float32)),
            pattern="neither its last nor its second axis is 1 or 3 colour channels"),
        own("empty.npy", _saved(np.zeros((0, 4), np.float32)), pattern=r"is empty"),
        own("one-row.npy", _saved(x[:1]), pattern="holds 1 datapoint.s.; a train/test split "
            "needs at least 2"),
        own("keys.npz", lambda p: np.savez(p, x), pattern=r"holds \['arr_0'\]; pvae reads 'x'"),
        own("labels-length.npz", _npz(x=x, y=np.zeros(19, np.int64)),
            pattern=r"y has shape \(19,\); expected \(20,\): one class label per datapoint"),
        own("labels-negative.npz", _npz(x=x, y=np.full(20, -1)),
            pattern=r"labels in \[-1, -1\]; labels are class indices"),
        own("labels-fractional.npz", _npz(x=x, y=np.full(20, 0.5)),
            pattern="not whole numbers; labels are class indices"),
        own("labels-strings.npz", _npz(x=x, y=np.array(["cat"] * 20)),
            pattern="y has dtype <U3.*labels are class indices"),
        own("split-shapes.npz", _npz(x_train=np.zeros((4, 8, 8), np.float32),
                                     x_test=np.zeros((4, 7, 7), np.float32)),
            pattern=r"x_train's datapoints have shape \(8, 8\), x_test's \(7, 7\)"),
        own("split-half.npz", _npz(x_train=x, y_train=np.zeros(20, np.int64), x_test=x),
            pattern=r"holds \['x_test', 'x_train', 'y_train'\]"),
        own("pickled.pt", _pt({"x": torch.from_numpy(x), "y": np.zeros(20)}),
            pattern="holds Python objects other than tensors, which pvae does not unpickle"),
        own("list.pt", _pt({"x": torch.from_numpy(x), "y": [0] * 20}),
            pattern="y is a list, not a tensor"),
        own("string.pt", _pt("x"), pattern="holds a str; pvae reads a tensor x"),
        own("pixels-255.npy", _saved(x * 255),
            pattern=r"binarize='dynamic' needs intensities in \[0, 1\], got values in .*; or "
                    "train with --binarize none"),
        own("fraction-1.npy", _saved(x), "--test-fraction", "1",
            pattern=r"test_fraction must lie in \(0, 1\)"),
        own("fraction-with-split.npz", _npz(x_train=x, x_test=x), "--test-fraction", "0.3",
            pattern=r"brings its own split \(x_train, x_test\); test_fraction"),
        own("data.csv", lambda p: p.write_text("1,2\n"), pattern="pvae reads .npy, .npz and "
            ".pt data files"),
        own("a-folder.npy", lambda p: p.mkdir(), pattern="a-folder.npy is not a file"),
        ("data-file-missing", "own-data",
         lambda: cli([*o, "--data-file", str(tmp / "own" / "nowhere.npy")]), 2,
         "data file .*nowhere.npy not found"),
        ("data-file-and-dataset", "own-data",
         lambda: cli([*t, "--dataset", "mnist", "--data-file", "x.npy"]), 2,
         "--dataset mnist and --data-file: choose one"),
        ("data-file-and-image-folder", "own-data",
         lambda: cli([*o, "--data-file", "x.npy", "--image-folder", "pngs"]), 2,
         "--data-file and --image-folder: choose one"),
        ("dataset-data-file-alone", "own-data", lambda: cli([*t, "--dataset", "data-file"]),
         2, "--dataset data-file needs --data-file"),
        ("image-size-for-data-file", "own-data",
         lambda: cli([*o, "--data-file", "x.npy", "--image-size", "8"]), 2,
         "--image-size applies to --image-folder, not --dataset data-file"),
        ("test-fraction-for-digits", "own-data", lambda: cli([*t, "--test-fraction", "0.5"]),
         2, "--test-fraction applies to --data-file and --image-folder, not --dataset digits"),
        ("load-option-unknown", "api", lambda: data.load("digits", data_file="x.npy"),
         TypeError, "the dataset 'digits' takes no option data_file"),
        folder("empty", {}, pattern="holds no PNG or JPEG images"),
        folder("mixed-sizes", {"a.png": GREY, "b.png": GREY[:7]},
               pattern=r"differ in size: a.png is 8x8, b.png is 7x8 .*pass --image-size H W"),
        folder("truncated", {"a.png": TRUNCATED_PNG,
                             "b.png": TRUNCATED_PNG[: len(TRUNCATED_PNG) // 2]},
               pattern=r"b.png cannot be read as an image \(image file is truncated"),
        folder("not-an-image", {"a.png": b"<html>not a picture</html>"},
               pattern="a.png is not a PNG or JPEG image Pillow can read"),
        folder("16-bit", {"a.png": np.zeros((4, 4), np.uint16)},
               pattern="has mode I;16 .16-bit or floating-point pixels."),
        folder("images-and-classes", {"a.png": GREY, "cats/b.png": GREY},
               pattern=r"holds both images \(a.png\) and class folders \(cats\)"),
        folder("empty-class", {"cats/a.png": GREY, "dogs": None},
               pattern="the class folder .*dogs holds no PNG or JPEG images"),
        folder("nested", {"cats/a.png": GREY, "cats/small/b.png": GREY},
               pattern="small is a folder inside the class folder cats"),
        folder("image-size-three", {"a.png": GREY, "b.png": GREY}, "--image-size", "1", "2",
               "3", pattern="--image-size takes H W or one side N"),
        folder("rgb-conv", {"a.png": RGB, "b.png": RGB}, "--network", "conv",
               pattern=r"--network conv needs one-channel images; .*\(8, 8, 3\)"),
        ("image-folder-rgb-mae", "own-data",
         lambda: cli(["train", "--model", "mae", "--no-progress", "--out", out, "--image-folder",
                      _own(tmp, "rgb-mae", _pngs({"a.png": RGB, "b.png": RGB}))]), 2,
         "--model mae needs one-channel images"),
        folder("rgb-condition", {"a.png": RGB, "b.png": RGB}, "--model", "cvae", "--condition",
               "top-half", pattern=r"condition 'top-half' needs image data with \(H, W\), got "
               r"image_shape=\(8, 8, 3\)"),
        ("image-folder-missing", "own-data",
         lambda: cli([*o, "--image-folder", str(tmp / "own" / "no-pngs")]), 2,
         "image folder .*no-pngs not found"),
        ("image-folder-is-a-file", "own-data",
         lambda: cli([*o, "--image-folder", _own(tmp, "a.png", lambda p: p.write_bytes(
             _png_bytes(GREY)))]), 2, "a.png is not a folder"),
        ("image-size-0", "api",
         lambda: data.load_image_folder(_own(tmp, "ok", _pngs({"a.png": GREY})),
                                        image_size=[0]), data.DataFileError,
         "image_size must be"),
        ("received-own-data-missing", "hostile-files",
         lambda: _received_own(tmp, "own-moved", lambda p: p.unlink()), 2,
         r"the run's data, .*own-data.npz' \(config.json's data_file\), is not found here"),
        ("received-own-data-changed", "hostile-files",
         lambda: _received_own(tmp, "own-changed", lambda p: np.savez(p, x=np.zeros(
             (60, 16), np.float32))), 2,
         r"the data at .*own-data.npz are not those the run was trained on"),
        # -- config files --------------------------------------------------------------------
        ("config-missing", "config-file",
         lambda: cli(["train", "--config", str(tmp / "configs" / "nowhere.json")]), 2,
         "--config .*nowhere.json: no such file"),
        config("not-json.json", "{latent_dim: 2", "is not valid JSON"),
        config("list.json", "[1, 2]", "must hold a mapping of flags to values, got a list"),
        config("deep.json", "[" * 100_000 + "]" * 100_000, "nests too deeply"),
        config("huge.json", " " * (1 << 20) + "{}", r"is larger than 1048576 bytes"),
        ("config-binary.json", "config-file",
         lambda: cli(["train", "--config", _own(tmp, "binary.json", lambda p: p.write_bytes(
             b"\xff\xfe{}")), "--out", out]), 2, "is not a UTF-8 text file"),
        config("flags.toml", "latent_dim = 2", "pvae reads .json, .yaml and .yml files"),
        config("bad.yaml", "latent_dim: [2\n", "is not valid YAML"),
        config("unknown.json", '{"lattent_dim": 2}',
               r"unknown setting\(s\) lattent_dim; the settings are pvae train's flags"),
        config("nested.json", '{"config": "other.json"}', r"unknown setting\(s\) config"),
        config("value.json", '{"latent_dim": 0}',
               r"config .*value.json: latent_dim: must be an integer >= 1, got 0"),
        config("choice.yaml", "model: gan\n", r"model: 'gan' is not one of vae, cvae"),
        config("list-for-one.json", '{"lr": [0.1, 0.2]}', "lr must be one value"),
        config("switch.json", '{"analytic_kl": "yes"}', "analytic_kl must be true or false"),
        config("empty-list.json", '{"hidden_dims": []}', "hidden_dims is an empty list"),
        config("flag-for-another-model.json", '{"model": "ae", "prior": "learned"}',
               "--prior applies to --model cvae, not --model ae"),
        record("ppca", lambda c: c.update(model="ppca"), "re-run a ppca run with pvae ppca"),
        record("pyro-loss", lambda c: c["training"]["loss"].update(name="Trace_ELBO"),
               "training.loss 'Trace_ELBO' is not one of pvae train's estimators"),
        record("beta", lambda c: c["training"]["loss"].update(beta="MyAnnealing(3)"),
               r"training.loss.beta = 'MyAnnealing\(3\)' cannot be set"),
        record("channels", lambda c: c["model_config"].update(channels=[16, 32]),
               r"model_config.channels = \[16, 32\] cannot be set by a flag of pvae train"),
        record("data-plate", lambda c: c["training"]["loss"].update(data_plate="batch"),
               "training.loss.data_plate = 'batch' cannot be set"),
        record("optimizer", lambda c: c["training"]["optim"].update(name="SGD"),
               "training.optim 'SGD' is not one of pvae train's optimizers"),
        record("schedule", lambda c: c["training"]["optim"].update(schedule={"name": "OneCycle"}),
               "training.optim.schedule .* is not one of pvae train's schedules"),
        record("unknown-key", lambda c: c.update(colour="blue"),
               r"unknown setting\(s\) colour in a run's record"),
        record("format", _format(2), "written by pvae 9.9.9 in run format 2"),
        # -- run formats ---------------------------------------------------------------------
        ("config-other-format", "versions",
         lambda: cli(["evaluate", str(edited_run(tmp, "format-config", lambda r: _edit_config(
             r, _format(2))))]), 2,
         r"config.json was written by pvae 9.9.9 in run format 2; this pvae .* reads format 1"),
        ("checkpoint-other-format", "versions",
         lambda: cli(["evaluate", str(edited_run(tmp, "format-checkpoint", lambda r: _checkpoint(
             r, _format(2))))]), 2,
         r"checkpoint.pt was written by pvae 9.9.9 in run format 2"),
        ("checkpoint-format-no-version", "versions",
         lambda: cli(["evaluate", str(edited_run(tmp, "format-anon", lambda r: _checkpoint(
             r, lambda s: (s.update(format=0), s.pop("versions")))))]), 2,
         r"was written by another pvae in run format 0"),
        ("resume-other-format", "versions",
         lambda: cli([*train, "--resume", "--out", str(edited_run(
             tmp, "format-resume", lambda r: _checkpoint(r, _format(7, "0.0.1"))))]), 2,
         "written by pvae 0.0.1 in run format 7"),
        ("load-checkpoint-other-format", "versions",
         lambda: __import__("pvae.train", fromlist=["x"]).load_checkpoint(
             edited_run(tmp, "format-api", lambda r: _checkpoint(r, _format(3))) / "checkpoint.pt"),
         ValueError, "run format 3"),
    ]


if __name__ == "__main__":  # python tests/bad_inputs.py: the catalogue's classification
    import collections
    import sys
    import tempfile
    import warnings
    from pathlib import Path

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        table = collections.defaultdict(collections.Counter)
        for case in cases(Path(folder)):
            verdict = classify(case)
            table[case[1]][verdict] += 1
            print(f"{verdict:8s} {case[0]}", file=sys.stderr)
        for category, counts in table.items():
            print(f"{category:14s} " + " ".join(f"{k}={counts[k]}" for k in
                                                 ("clear", "handled", "unclear", "silent",
                                                  "lost")))
        total = sum(table.values(), collections.Counter())
        print(f"{'all':14s} " + " ".join(f"{k}={total[k]}" for k in
                                         ("clear", "handled", "unclear", "silent", "lost")))
