"""Pyro programs as Pyro users write them (issue 13), against the closed form of a
linear-Gaussian model (log p(x) = log N(x; 0, I + w w^T)): a model that does not broadcast over
a vectorized particle dim is evaluated one particle at a time; fit's history is the unscaled ELBO
per datapoint whatever the program's scaling; non-amortized guides (Pyro's AutoNormal,
per-datapoint pyro.params) and lazily built networks train and evaluate; any Pyro ELBO trains."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import nn

from pvae.inference import elbo_terms, iw_log_likelihood, log_weights
from pvae.train import fit


class MaskedLinearGaussian:
    """z ~ N(0, 1), x | z ~ N(w z, I); the model selects the observed pixels with a boolean
    mask and a reshape to (N, -1), as Pyro's examples/cvae does, which does not broadcast over
    a leading particle dim. The guide is the exact posterior
    N(w^T x / (1 + |w|^2), 1 / (1 + |w|^2)), so every log weight equals log p(x)."""

    def __init__(self, w):
        self.w = w

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            loc = z.unsqueeze(-1) * self.w
            observed = torch.ones_like(x, dtype=torch.bool)
            loc = loc[observed].view(x.shape[0], -1)  # IndexError with particles
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.w / precision, precision ** -0.5))

    def log_marginal(self, x):
        cov = torch.eye(len(self.w)) + torch.outer(self.w, self.w)
        return dist.MultivariateNormal(torch.zeros(len(self.w)), cov).log_prob(x)


@pytest.fixture
def masked():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    model = MaskedLinearGaussian(w)
    x = torch.randn(40, 1, generator=g, dtype=torch.float64) * w + torch.randn(
        40, 5, generator=g, dtype=torch.float64)
    return model, x


def test_model_without_particle_broadcasting_is_evaluated_sequentially(masked):
    model, x = masked
    with pytest.raises(IndexError):  # what vectorized particles do to this model
        with pyro.plate("particles", 3, dim=-2):
            model.model(x)
    with pytest.warns(RuntimeWarning, match="does not run with vectorized particles"):
        iw = iw_log_likelihood(model, x, num_samples=20, seed=0)
    # the exact-posterior guide: every weight is p(x), the estimate is exact to rounding
    assert torch.allclose(iw.per_datapoint, model.log_marginal(x), atol=1e-9)
    assert torch.allclose(iw.ess, torch.full((len(x),), 20.0, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="vectorized particles"):
        lw = log_weights(model, x, num_samples=4)
    assert lw.shape == (4, len(x))
    with pytest.warns(RuntimeWarning, match="vectorized particles"):
        terms = elbo_terms(model, x, num_samples=1)
    # KL(q || p(z | x)) = 0: the ELBO is log p(x); one draw of E_q[log p(x | z)] with the
    # analytic KL(q || p(z)) is unbiased for it
    diff = terms.elbo - model.log_marginal(x)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5, diff
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="num_samples=1"):
        elbo_terms(model, x, num_samples=5)


def test_model_errors_are_not_hidden_by_the_fallback(masked):
    model, x = masked

    def broken(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            raise KeyError("a bug in the model")

    model.model = broken
    with pytest.raises(KeyError, match="a bug in the model"):
        iw_log_likelihood(model, x, num_samples=5)


# ---------------------------------------------------------------------------------------------
# Training any program: units, non-amortized and lazy guides, any ELBO


def linear_gaussian_data(n=100, d=3, seed=0):
    """x = w z + noise, z ~ N(0, 1), noise ~ N(0, I): data of the linear-Gaussian model."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    return w, torch.randn(n, 1, generator=g) * w + torch.randn(n, d, generator=g)


def exact_log_marginal(w, x):
    """log N(x; 0, I + w w^T), per datapoint."""
    cov = torch.eye(len(w)) + torch.outer(w, w)
    return dist.MultivariateNormal(torch.zeros(len(w)), cov).log_prob(x)


class ExactPosterior(nn.Module):
    """z ~ N(0, 1), x | z ~ N(w z, I), with the exact posterior as guide: every log weight is
    log p(x), whatever z is drawn, so any ELBO estimate is log p(x) to rounding. ``scaling``
    is how the program scales its data term: ``None``, ``"subsample"`` (``model(x, idx)`` with
    ``pyro.plate("data", N, subsample=idx)``) or ``"scale"`` (``poutine.scale(scale=N / n)``
    around model and guide, as with Pyro's mini-batch examples)."""

    def __init__(self, w, num_data, scaling=None):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.num_data, self.scaling = num_data, scaling

    def _plate(self, x, idx):
        if self.scaling == "subsample":
            return pyro.plate("data", self.num_data, subsample=idx)
        return pyro.plate("data", x.shape[0])

    def _scaled(self, x):
        s = self.num_data / x.shape[0] if self.scaling == "scale" else 1.0
        return poutine.scale(scale=s)

    def model(self, x, idx=None):
        with self._scaled(x), self._plate(x, idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x, idx=None):
        precision = 1 + self.w @ self.w
        with self._scaled(x), self._plate(x, idx):
            pyro.sample("z", dist.Normal(x @ self.w / precision, precision ** -0.5))


@pytest.mark.parametrize("scaling", [None, "subsample", "scale"])
def test_history_is_the_unscaled_elbo_per_datapoint(scaling):
    """fit's history is in nats per datapoint whatever the program's scaling: with the exact
    posterior as guide every step's ELBO is the batch's mean log p(x), so an epoch's value is
    the data's mean log p(x) (the parameter barely moves at lr 1e-8). Unscaled, a subsampled
    plate or poutine.scale(N / n) would report 4x that."""
    w, x = linear_gaussian_data()
    model = ExactPosterior(w, len(x), scaling)
    history = fit(model, x, c=torch.arange(len(x)), num_epochs=2, batch_size=25, lr=1e-8,
                  seed=0, progress=False)
    exact = exact_log_marginal(w, x).mean().item()
    for value in history.column("train_elbo"):
        assert value == pytest.approx(exact, abs=1e-4), (value, exact)


class AutoNormalLinearGaussian(nn.Module):
    """The linear-Gaussian model with fixed w and Pyro's AutoNormal as guide: one Normal per
    datapoint's z, non-amortized (parameters of shape (N,)), which contains the exact posterior
    N(w^T x / (1 + |w|^2), 1 / (1 + |w|^2))."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)
        self.guide = AutoNormal(self.model)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_autonormal_guide_trains_on_full_batches_and_evaluates():
    """Pyro's AutoNormal as the guide, full batches: the probe is the training batch (no
    shape mismatch with an 8-datapoint probe) in stored order (a shuffled full batch would
    hand datapoint n's parameters another datapoint each epoch)."""
    w, x = linear_gaussian_data()
    model = AutoNormalLinearGaussian(w)
    # 16 particles and a decaying learning rate: little gradient noise around the optimum
    fit(model, x, num_epochs=300, batch_size=len(x), lr=0.1, lr_decay=0.99, num_particles=16,
        seed=0, progress=False)
    precision = 1 + w @ w
    loc, scale = model.guide._get_loc_and_scale("z")
    # the exact posterior's mean, in posterior sds; measured 0.10 (Adam's jitter); sds 5% off
    err = (loc.detach() - x @ w / precision) * precision.sqrt()
    assert err.abs().max() < 0.2, err.abs().max()
    assert scale.detach().mul(precision.sqrt()).sub(1).abs().max() < 0.1
    exact = exact_log_marginal(w, x)
    iw = iw_log_likelihood(model, x, num_samples=500, seed=0)
    diff = iw.per_datapoint - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()
    terms = elbo_terms(model, x, num_samples=100)
    gap = exact - terms.elbo  # KL(q || p(z | x)) >= 0, ~0 here
    assert abs(gap.mean()) < 3 * gap.std() / len(gap) ** 0.5 + 0.01, gap.mean()
    with pytest.raises(ValueError, match="per-datapoint parameters.*batch_size=len"):
        iw_log_likelihood(model, x, num_samples=5, batch_size=50)


class PerDatapointGuide(nn.Module):
    """The linear-Gaussian model (fixed w) with a non-amortized guide written by hand: a
    ``pyro.param`` loc and scale per datapoint, indexed by plate subsampling with the
    datapoints' indices (passed as the second data argument), so mini-batches work."""

    def __init__(self, w, num_data):
        super().__init__()
        self.register_buffer("w", w)
        self.num_data = num_data

    def model(self, x, idx):
        with pyro.plate("data", self.num_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x, idx):
        loc = pyro.param("per_datapoint_loc", lambda: x.new_zeros(self.num_data))
        scale = pyro.param("per_datapoint_scale", lambda: x.new_ones(self.num_data),
                           constraint=dist.constraints.positive)
        with pyro.plate("data", self.num_data, subsample=idx):
            pyro.sample("z", dist.Normal(loc[idx], scale[idx]))


def test_per_datapoint_param_guide_with_subsampling():
    w, x = linear_gaussian_data()
    model, idx = PerDatapointGuide(w, len(x)), torch.arange(len(x))
    history = fit(model, x, c=idx, num_epochs=300, batch_size=20, lr=0.1, lr_decay=0.99,
                  num_particles=4, seed=0, progress=False)
    exact = exact_log_marginal(w, x)
    # the history is per datapoint and unscaled (the plate scales the batch by 100 / 20 = 5,
    # which would read -27.6): at the end the guide is near exact, so the ELBO is near the mean
    # log p(x) (measured -5.520 vs -5.514, the mean KL(q || p(z | x)))
    late = torch.tensor(history.column("train_elbo")[-20:])
    assert abs(late.mean() - exact.mean()) < 0.05, (late.mean(), exact.mean())
    precision = 1 + w @ w
    loc = pyro.param("per_datapoint_loc").detach()
    err = (loc - x @ w / precision) * precision.sqrt()
    # in posterior sds; measured 0.24 (the last steps' noise); a datapoint scored with another
    # datapoint's parameters would be off by the distance between their posterior means (~1)
    assert err.abs().max() < 0.5, err.abs().max()
    iw = iw_log_likelihood(model, x, c=idx, num_samples=500, seed=0, batch_size=30)
    diff = iw.per_datapoint - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()


class LazyLinearGaussian(nn.Module):
    """A model with no parameters when it is built: its networks are created in the first
    call, sized by the data (what a user writes when the data decide the widths)."""

    def __init__(self):
        super().__init__()
        self.decoder = self.encoder = None

    def _build(self, x):
        if self.decoder is None:
            self.decoder = nn.Linear(1, x.shape[-1]).to(x)
            self.encoder = nn.Linear(x.shape[-1], 2).to(x)

    def model(self, x):
        self._build(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        self._build(x)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


@pytest.mark.parametrize("lazy", ["created-in-call", "LazyLinear"])
def test_lazy_modules_are_built_on_the_first_batch_and_trained(lazy):
    w, x = linear_gaussian_data(n=200)
    if lazy == "created-in-call":
        model = LazyLinearGaussian()
        assert not list(model.parameters())
    else:
        model = LazyLinearGaussian()
        model.decoder, model.encoder = nn.LazyLinear(x.shape[-1]), nn.LazyLinear(2)
    history = fit(model, x, num_epochs=60, batch_size=50, lr=0.03, seed=0, progress=False)
    assert len(list(model.parameters())) == 4
    # maximum likelihood of a rank-1 factor model: the fitted marginal approaches the truth's
    iw = iw_log_likelihood(model, x, num_samples=200, seed=0)
    exact = exact_log_marginal(w, x)
    assert history.column("train_elbo")[-1] > history.column("train_elbo")[0] + 0.5
    assert iw.mean > exact.mean().item() - 0.15, (iw.mean, exact.mean().item())


def test_nothing_to_train_is_refused_clearly():
    class Nothing:
        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
                pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x)

        def guide(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))

    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(Nothing(), torch.randn(10, 2), num_epochs=1, progress=False)


def test_joint_autoguide_trains_and_its_evaluation_is_refused_clearly():
    """AutoDiagonalNormal (one joint latent over all datapoints) trains with full batches, as
    under Pyro's SVI; it has no per-datapoint q(z_n | x_n), so evaluation says so."""
    w, x = linear_gaussian_data(n=40)
    model = AutoNormalLinearGaussian(w)
    model.guide = AutoDiagonalNormal(model.model)
    history = fit(model, x, num_epochs=100, batch_size=len(x), lr=0.05, seed=0, progress=False)
    exact = exact_log_marginal(w, x).mean().item()
    assert history.column("train_elbo")[-1] > history.column("train_elbo")[0]
    assert history.column("train_elbo")[-1] < exact + 0.5  # an ELBO, per datapoint
    with pytest.raises(ValueError, match="AutoDiagonalNormal.*no per-datapoint"):
        iw_log_likelihood(model, x, num_samples=5)
