"""The bad-input catalogue: public API and command-line calls that must fail with a clear
error. Each case is ``(id, category, call, expected, pattern)``:

- ``call()`` makes the bad call (a CLI case returns ``cli([...])``'s result);
- ``expected`` is the exception class, or for the CLI the exit code;
- ``pattern`` must match the message: it names the parameter (or file) that is wrong.

``tests/test_bad_input.py`` runs them. Only public names are used, so the same catalogue can
be run against an older pvae to count how many answers were clear, unclear or silent.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math

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
    """``clear`` (the expected error, naming what is wrong), ``unclear`` (another error, a
    traceback, or a message that does not name it) or ``silent`` (no error at all)."""
    import re

    _, category, call, expected, pattern = case
    if category == "cli":
        try:
            code, err = call()
        except Exception:  # a traceback out of the command line
            return "unclear"
        if code == 0:
            return "silent"
        one_line = err.strip().startswith("pvae: ") and err.strip().count("\n") == 0
        return "clear" if one_line and re.search(pattern, err) else "unclear"
    try:
        call()
    except Exception as e:  # noqa: BLE001 - classifying any failure
        ok = isinstance(e, expected) and re.search(pattern, str(e))
        return "clear" if ok else "unclear"
    return "silent"


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
            print(f"{category:10s} " + " ".join(f"{k}={counts[k]}" for k in
                                                 ("clear", "unclear", "silent")))
