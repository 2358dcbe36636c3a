import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pvae.inference import ScoreFunctionELBO, elbo_terms, iw_log_likelihood
from pvae.models import VAE
from pvae.train import (
    Adam,
    Callback,
    CheckpointError,
    CosineLR,
    StepLR,
    TrainingDivergedError,
    fit,
)

from conftest import rng


class UserFactorAnalysis:
    """A user-written model: not a pvae class, parameters via pyro.param / pyro.module."""

    def __init__(self, x_dim=6, latent_dim=2):
        self.x_dim, self.latent_dim = x_dim, latent_dim
        self.encoder = nn.Linear(x_dim, 2 * latent_dim)

    def model(self, x):
        W = pyro.param("user_W", lambda: 0.1 * torch.randn(self.latent_dim, self.x_dim))
        noise = pyro.param("user_noise", lambda: torch.ones(self.x_dim),
                           constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0)
                            .to_event(1))
            pyro.sample("x", dist.Normal(z @ W, noise).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("user_encoder", self.encoder)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def fa_data(n=512, seed=0):
    g = rng(seed)
    W = torch.randn(2, 6, generator=g)
    return torch.randn(n, 2, generator=g) @ W + 0.3 * torch.randn(n, 6, generator=g)


def test_user_model_trains_and_evaluates():
    user, x = UserFactorAnalysis(), fa_data()
    history = fit(user, x, num_epochs=40, batch_size=128, optim=Adam(3e-2), progress=False)
    elbos = history.column("train_elbo")
    assert elbos[-1] > elbos[0] + 2.0
    iw = iw_log_likelihood(user, x[:100], num_samples=500)
    # the exact marginal of the fitted linear-Gaussian model bounds the IW estimate
    W, noise = pyro.param("user_W").detach(), pyro.param("user_noise").detach()
    exact = dist.MultivariateNormal(torch.zeros(6), W.T @ W + torch.diag(noise**2)).log_prob(x[:100])
    diff = iw.per_datapoint - exact
    assert diff.mean().abs() < 3 * diff.std() / 10 + 0.05
    assert elbo_terms(user, x[:100]).elbo.mean() < iw.mean


def test_dataset_input_streams():
    x = torch.bernoulli(torch.rand(100, 12))
    model = VAE(12, 2, (8,))
    history = fit(model, TensorDataset(x), num_epochs=2, batch_size=32, progress=False)
    assert len(history) == 2 and math.isfinite(history[-1]["train_elbo"])
    assert history[-1]["images_per_s"] > 0


def test_seeded_determinism():
    x = torch.rand(200, 12)

    def run():
        model = VAE(12, 2, (8,))
        return fit(model, x, val=torch.bernoulli(x[:50]), num_epochs=3, batch_size=32, binarize="dynamic",
                   seed=5, progress=False)

    torch.manual_seed(1)
    a = run()
    torch.manual_seed(1)
    b = run()
    for key in ("train_elbo", "val_elbo"):
        assert a.column(key) == b.column(key)


def test_resume_equals_uninterrupted(tmp_path):
    x = torch.rand(200, 12)

    def model():
        torch.manual_seed(3)
        return VAE(12, 2, (8,))

    kwargs = dict(batch_size=32, binarize="dynamic", seed=2, progress=False)
    full = fit(model(), x, num_epochs=4, **kwargs)
    part = model()
    fit(part, x, num_epochs=2, checkpoint_dir=tmp_path, **kwargs)
    resumed_model = model()
    resumed = fit(resumed_model, x, num_epochs=4, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.column("train_elbo") == full.column("train_elbo")


def test_resume_with_other_config_is_refused(tmp_path):
    x = torch.bernoulli(torch.rand(64, 12))
    fit(VAE(12, 2, (8,)), x, num_epochs=1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="another configuration"):
        fit(VAE(12, 2, (8,)), x, num_epochs=2, optim=Adam(0.5), checkpoint_dir=tmp_path, resume=True,
            progress=False)


class Exploding(VAE):
    """Its model call returns NaN on the first step of epoch 2."""

    calls = 0

    def model(self, x, c=None):
        type(self).calls += 1
        if type(self).calls == 1 + 2 + 1:  # probe + epoch 1 (2 steps) + step 1 of epoch 2
            x = x * float("nan")
        super().model(x, c)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    x = torch.bernoulli(torch.rand(64, 12))
    model = Exploding(12, 2, (8,))
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 1.*end of epoch 1"):
        fit(model, x, num_epochs=3, batch_size=32, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_data_are_refused():
    model = VAE(12, 2, (8,))
    with pytest.raises(ValueError, match="NaN"):
        fit(model, torch.full((4, 12), float("nan")), num_epochs=1, progress=False)
    with pytest.raises(ValueError, match="binarize"):
        fit(model, torch.rand(4, 12), num_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"shape \(batch, 12\)"):
        fit(model, torch.ones(4, 3), num_epochs=1, progress=False)
    with pytest.raises(TypeError, match="model contract"):
        fit(object(), torch.ones(4, 3), num_epochs=1)


@pytest.mark.parametrize("baseline", ["average", "neural"])
def test_score_function_resume_equals_uninterrupted(tmp_path, baseline):
    """The objective's state (the decaying average, the neural baselines' networks) is part of
    the checkpoint: 2 epochs + resume to 4 equals 4 epochs, history and final parameters."""
    x = torch.bernoulli(torch.rand(96, 12, generator=rng(0)))

    def model():
        torch.manual_seed(3)
        return VAE(12, 2, (8,))

    kwargs = dict(batch_size=32, seed=4, optim=Adam(1e-2), progress=False)
    loss = lambda: ScoreFunctionELBO(baseline=baseline)  # noqa: E731  (a fresh one per run)
    full_model = model()
    full = fit(full_model, x, num_epochs=4, loss=loss(), **kwargs)
    fit(model(), x, num_epochs=2, checkpoint_dir=tmp_path, loss=loss(), **kwargs)
    resumed_model = model()
    resumed = fit(resumed_model, x, num_epochs=4, checkpoint_dir=tmp_path, resume=True,
                  loss=loss(), **kwargs)
    assert resumed.column("train_elbo") == full.column("train_elbo")
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["objective"]
    if baseline == "neural":
        assert any(k.startswith("estimator.nets.z.") for k in state)
    else:
        assert isinstance(state["estimator._extra_state"]["average"], float)


def test_train_test_splits_are_refused_with_what_to_pass():
    from pvae import data

    with pytest.raises(TypeError, match=r"splits\.x_train"):
        fit(VAE(64, 2, (8,)), data.load("digits", binarize="static"), num_epochs=1)


class RecordingGaussian:
    """x ~ Normal(loc, 1) with a learned ``loc`` and no latent variable (so the ELBO is
    log p(x), exactly): the model records each call's per-datapoint log p(x) at the ``loc``
    of that step, computed here with torch on its own."""

    def __init__(self):
        self.calls = []

    def model(self, x):
        loc = pyro.param("loc", torch.zeros(x.shape[1]))
        self.calls.append(torch.distributions.Normal(loc.detach().double(), 1.0)
                          .log_prob(x.double()).sum(-1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


def test_epoch_value_weights_a_partial_last_batch_by_its_datapoints():
    """10 datapoints in batches of 4: 4, 4 and a last batch of 2 per epoch. The epoch's
    train_elbo is the datapoint-weighted mean of the steps' per-datapoint values (the mean
    over the epoch's 10 datapoints, each at its step's parameters), not the mean of the three
    batch means, which differs here by far more than float32 rounding."""
    x = (torch.arange(10.0) ** 1.5 / 3).unsqueeze(-1)
    model = RecordingGaussian()
    history = fit(model, x, num_epochs=3, batch_size=4, optim=Adam(0.2), progress=False)
    steps = model.calls[1:]  # the first call is fit's probe of the programs
    assert [len(s) for s in steps] == [4, 4, 2] * 3
    for epoch, row in enumerate(history):
        batches = steps[3 * epoch:3 * epoch + 3]
        weighted = torch.cat(batches).mean().item()
        unweighted = torch.stack([b.mean() for b in batches]).mean().item()
        assert row["train_elbo"] == pytest.approx(weighted, abs=1e-5)
        assert abs(unweighted - weighted) > 1e-2
    assert len({round(r["train_elbo"], 6) for r in history}) == 3  # loc moved between epochs


class Crash(Callback):
    """Fails at the end of epoch ``epoch``, before the loop's checkpoint of it: the run is cut
    off as a kill would, with the checkpoint of the epoch before on disk."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state, row):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt(f"cut off in epoch {self.epoch}")


def _rows(history):
    """The history's values but the wall-clock ones, as exact reprs (NaN equal to NaN)."""
    return [{k: repr(v) for k, v in row.items() if k not in ("seconds", "images_per_s")}
            for row in history]


@pytest.mark.parametrize("schedule", [
    CosineLR(warmup_steps=5, min_lr=1e-4),  # stepped after every optimizer step
    StepLR(step_size=2, gamma=0.5),  # stepped after every epoch
])
def test_resume_under_a_learning_rate_schedule_equals_uninterrupted(tmp_path, schedule):
    """5 epochs under a schedule (3 steps per epoch) against 2 epochs, cut off during the
    third, then resumed to 5: the histories (learning rate included) and the final parameters
    and optimizer states are identical. A scheduler restarted from step 0 on resume would warm
    up again (cosine) or halve after epochs 3 and 5 instead of 2 and 4 (step)."""
    x = torch.bernoulli(torch.rand(96, 12, generator=rng(0)))

    def run(folder, callbacks=(), resume=False):
        torch.manual_seed(3)
        model = VAE(12, 2, (8,))
        history = fit(model, x, num_epochs=5, batch_size=32, optim=Adam(1e-2, schedule=schedule),
                      seed=1, checkpoint_dir=folder, resume=resume, callbacks=callbacks,
                      progress=False)
        return model, history

    full_model, full = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt, match="epoch 3"):
        run(tmp_path / "cut", [Crash(3)])
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed_model, resumed = run(tmp_path / "cut", resume=True)
    assert _rows(resumed) == _rows(full)
    assert len(set(full.column("lr"))) >= 3  # the schedule moved the learning rate
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    saved = [torch.load(tmp_path / f / "checkpoint.pt", weights_only=True) for f in ("whole", "cut")]
    for part in ("optimizer", "scheduler"):
        assert str(saved[0][part]) == str(saved[1][part]), part
