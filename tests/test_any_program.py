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
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import nn
from torch.utils.data import TensorDataset

from pvae.inference import (
    IWAE,
    LOSSES,
    ReparamELBO,
    elbo_terms,
    guide_samples,
    inference_gap,
    iw_log_likelihood,
    log_weights,
    nuts_posterior,
)
from pvae.train import Adam, ExponentialLR, fit


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
    # several particles: one trace per particle, as IW does (issue 26)
    with pytest.warns(RuntimeWarning, match="vectorized particles"):
        terms = elbo_terms(model, x, num_samples=5)
    diff = terms.elbo - model.log_marginal(x)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5, diff


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
    """``(w, x)``: a random w and x = w z + noise, z ~ N(0, 1), noise ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    return w, torch.randn(n, 1, generator=g) * w + torch.randn(n, d, generator=g)


def linear_gaussian_draws(w, n, seed):
    """n datapoints x = w z + noise of the linear-Gaussian model with this w."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g) * w + torch.randn(n, len(w), generator=g)


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
    history = fit(model, x, torch.arange(len(x)), num_epochs=2, batch_size=25, optim=Adam(1e-8), seed=0,
                  progress=False)
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
    fit(model, x, num_epochs=300, batch_size=len(x), optim=Adam(0.1, schedule=ExponentialLR(0.99)),
        loss=ReparamELBO(num_particles=16), seed=0, progress=False)
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
    history = fit(model, x, idx, num_epochs=300, batch_size=20, optim=Adam(0.1, schedule=ExponentialLR(0.99)),
                  loss=ReparamELBO(num_particles=4), seed=0, progress=False)
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
    history = fit(model, x, num_epochs=60, batch_size=50, optim=Adam(0.03), seed=0, progress=False)
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
    history = fit(model, x, num_epochs=100, batch_size=len(x), optim=Adam(0.05), seed=0, progress=False)
    exact = exact_log_marginal(w, x).mean().item()
    assert history.column("train_elbo")[-1] > history.column("train_elbo")[0]
    assert history.column("train_elbo")[-1] < exact + 0.5  # an ELBO, per datapoint
    with pytest.raises(ValueError, match="AutoDiagonalNormal.*no per-datapoint"):
        iw_log_likelihood(model, x, num_samples=5)


class MixtureLatent(nn.Module):
    """A discrete latent enumerated by TraceEnum_ELBO: k ~ Categorical(pi), z | k ~ N(mu_k, 1),
    x | z ~ N(w z, I), with fixed pi, mu, w (buffers), so that

        log p(x) = log sum_k pi_k N(x; mu_k w, I + w w^T).

    The guide q(k | x) q(z | x, k), ``config_enumerate``-d, contains the exact posterior:
    q(k | x) has logits linear in x and q(z | x, k) = N(v (w^T x + mu_k), v),
    v = 1 / (1 + |w|^2)."""

    def __init__(self, w, pi=(0.3, 0.7), mu=(-2.0, 2.0)):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("pi", torch.tensor(pi))
        self.register_buffer("mu", torch.tensor(mu))
        self.classifier = nn.Linear(len(w), 2)  # logits of q(k | x)
        self.a = nn.Parameter(torch.zeros(len(w)))  # q(z | x, k) = N(a^T x + b_k, s)
        self.b = nn.Parameter(torch.zeros(2))
        self.log_s = nn.Parameter(torch.zeros(()))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(self.pi))
            z = pyro.sample("z", dist.Normal(self.mu[k], 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    @config_enumerate
    def guide(self, x):
        logits = self.classifier(x)
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(logits=logits))
            pyro.sample("z", dist.Normal(x @ self.a + self.b[k], self.log_s.exp()))

    def log_marginal(self, x):
        cov = torch.eye(len(self.w)) + torch.outer(self.w, self.w)
        parts = [self.pi[k].log() + dist.MultivariateNormal(self.mu[k] * self.w, cov).log_prob(x)
                 for k in range(2)]
        return torch.logsumexp(torch.stack(parts), 0)


def mixture_data(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(model.pi, n, replacement=True, generator=g)
    z = model.mu[k] + torch.randn(n, generator=g)
    return z.unsqueeze(-1) * model.w + torch.randn(n, len(model.w), generator=g)


def test_any_pyro_elbo_trains_an_enumerated_discrete_latent():
    """fit(loss=TraceEnum_ELBO(max_plate_nesting=1)) sums the discrete latent out exactly, as
    upstream Pyro trains such models; evaluation samples it from q(k | x) and the IW estimate
    matches the closed form."""
    w, _ = linear_gaussian_data()
    model = MixtureLatent(w)
    x, x_val = mixture_data(model, 300, 0), mixture_data(model, 100, 1)
    history = fit(model, x, val=x_val, loss=TraceEnum_ELBO(max_plate_nesting=1), num_epochs=60, batch_size=50,
                  optim=Adam(0.05, schedule=ExponentialLR(0.97)), seed=0, progress=False)
    exact = model.log_marginal(x_val)
    iw = iw_log_likelihood(model, x_val, num_samples=1000, seed=0)
    diff = iw.per_datapoint - exact
    se = diff.std() / len(diff) ** 0.5
    assert abs(diff.mean()) < 3 * se + 1e-3, (diff.mean(), se)
    # the validation value is minus the same loss per datapoint: an ELBO with k summed out,
    # at most log p(x) and close to it with a near-exact guide
    val = history.column("val_elbo")[-1]
    assert exact.mean() - 0.1 < val < exact.mean() + 0.01, (val, exact.mean())


def test_a_callable_loss_trains_and_bad_losses_are_refused():
    w, x = linear_gaussian_data()
    model = ExactPosterior(w, len(x))

    def loss(model_fn, guide_fn, *args):
        return Trace_ELBO().differentiable_loss(model_fn, guide_fn, *args)

    history = fit(model, x, loss=loss, num_epochs=1, batch_size=25, optim=Adam(1e-8), progress=False)
    assert history[-1]["train_elbo"] == pytest.approx(exact_log_marginal(w, x).mean().item(),
                                                      abs=1e-4)
    with pytest.raises(TypeError, match="differentiable_loss.*ScoreFunctionELBO"):
        fit(model, x, loss=TraceGraph_ELBO(), num_epochs=1, progress=False)
    with pytest.raises(TypeError, match="pass the ELBO itself"):
        fit(model, x, loss=Trace_ELBO()(model.model, model.guide), num_epochs=1, progress=False)
    with pytest.raises(TypeError, match=r"estimator=: it moved to the loss object"):
        fit(model, x, loss=Trace_ELBO(), estimator="iwae", num_epochs=1)
    with pytest.raises(TypeError, match="0-dim tensor"):
        fit(model, x, loss=lambda *a: 1.0, num_epochs=1, progress=False)


class BatchPlate(nn.Module):
    """The linear-Gaussian model (fixed w) with its plate named ``"batch"``, as in Pyro's
    scanVI example, an amortized guide q(z | x) = N(a^T x + b, s) that contains the exact
    posterior, and optionally a global latent u (outside the plate) to be refused."""

    def __init__(self, w, global_latent=False):
        super().__init__()
        self.register_buffer("w", w)
        self.a = nn.Parameter(torch.zeros(len(w)))
        self.b = nn.Parameter(torch.zeros(()))
        self.log_s = nn.Parameter(torch.zeros(()))
        self.global_latent = global_latent

    def model(self, x):
        shift = 0.0
        if self.global_latent:
            shift = pyro.sample("u", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w + shift, 1.0).to_event(1),
                        obs=x)

    def guide(self, x):
        if self.global_latent:
            pyro.sample("u", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.a + self.b, self.log_s.exp()))


@pytest.mark.parametrize("estimator", ["reparam", "iwae"])
def test_data_plate_is_found_whatever_its_name(estimator):
    w, x = linear_gaussian_data(n=300)
    model = BatchPlate(w)
    fit(model, x, loss=LOSSES[estimator](num_particles=4), num_epochs=60, batch_size=50,
        optim=Adam(0.05, schedule=ExponentialLR(0.97)), seed=0, progress=False)
    x_test = linear_gaussian_draws(w, 100, seed=1)  # held-out data of the same model
    exact = exact_log_marginal(w, x_test)
    iw = iw_log_likelihood(model, x_test, num_samples=500, seed=0)
    diff = iw.per_datapoint - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()
    terms = elbo_terms(model, x_test, num_samples=50)
    gap = exact - terms.elbo  # KL(q || p(z | x)) >= 0, small for a near-exact guide
    se = gap.std() / len(gap) ** 0.5
    assert -3 * se < gap.mean() < 3 * se + 0.02, (gap.mean(), se)
    assert iw_log_likelihood(model, x_test, num_samples=500, seed=0,
                             data_plate="batch").mean == iw.mean
    with pytest.raises(ValueError, match="data_plate='data' does not enclose"):
        iw_log_likelihood(model, x_test, num_samples=5, data_plate="data")


def test_only_sites_really_outside_the_data_plate_are_called_global():
    w, x = linear_gaussian_data(n=20)
    with pytest.raises(ValueError, match=r"site 'u' is outside pyro.plate\('batch', \.\.\.\), "
                                         "the data plate"):
        iw_log_likelihood(BatchPlate(w, global_latent=True), x, num_samples=5)


class MaskedAmortized(nn.Module):
    """The boolean-mask linear-Gaussian model of :class:`MaskedLinearGaussian` (no broadcasting
    over a leading particle dim) with a learnable amortized guide N(a^T x + b, s), a family
    that contains the exact posterior."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)
        self.a = nn.Parameter(torch.zeros(len(w)))
        self.b = nn.Parameter(torch.zeros(()))
        self.log_s = nn.Parameter(torch.zeros(()))

    def model(self, x):
        return MaskedLinearGaussian.model(self, x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.a + self.b, self.log_s.exp()))


@pytest.mark.parametrize("gradient", ["standard", "dreg"])
def test_iwae_trains_a_model_without_particle_broadcasting(gradient):
    """The IWAE objective falls back to one trace per particle, as evaluation does: the bound
    is exact for the exact-posterior guide, and a learnable guide trained through it reaches
    the closed-form log p(x)."""
    w, x = linear_gaussian_data(n=200)
    exact_model = ExactPosterior(w, len(x))
    exact_model.model = lambda x: MaskedLinearGaussian.model(exact_model, x)
    with pytest.warns(RuntimeWarning, match="training one particle at a time"):
        history = fit(exact_model, x, loss=IWAE(3, gradient=gradient), num_epochs=1, batch_size=50,
                      optim=Adam(1e-8), progress=False)
    assert history[-1]["train_elbo"] == pytest.approx(exact_log_marginal(w, x).mean().item(),
                                                      abs=1e-4)
    model = MaskedAmortized(w)
    with pytest.warns(RuntimeWarning, match="training one particle at a time"):
        fit(model, x, loss=IWAE(4, gradient=gradient), num_epochs=40, batch_size=50,
            optim=Adam(0.05, schedule=ExponentialLR(0.95)), seed=0, progress=False)
    precision = 1 + w @ w
    # the exact posterior N(w^T x / precision, 1 / precision); measured with the standard
    # gradient 0.009 (a), 0.007 (b), 2% (s); with DReG 1e-4, 5e-5, 0.1%
    assert (model.a.detach() - w / precision).abs().max() < 0.02
    assert abs(model.b.item()) < 0.02
    assert abs(model.log_s.exp().item() * precision.sqrt().item() - 1) < 0.05
    x_test = linear_gaussian_draws(w, 100, seed=1)
    with pytest.warns(RuntimeWarning, match="evaluating one particle at a time"):
        iw = iw_log_likelihood(model, x_test, num_samples=200, seed=0)
    diff = iw.per_datapoint - exact_log_marginal(w, x_test)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()


def test_observed_sites_with_different_scales_warn_once():
    """No single factor makes a weighted objective per datapoint: one warning, and the value is
    divided by the batch size only."""
    w, x = linear_gaussian_data(n=40)
    model = ExactPosterior(w, len(x))

    def weighted(x, idx=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * model.w, 1.0).to_event(1), obs=x)
            with poutine.scale(scale=0.5):
                pyro.sample("x_again", dist.Normal(z, 1.0), obs=x[:, 0])

    model.model = weighted
    with pytest.warns(RuntimeWarning, match="different scales") as record:
        fit(model, x, num_epochs=2, batch_size=10, optim=Adam(1e-3), progress=False)
    assert len([r for r in record if "different scales" in str(r.message)]) == 1


class ThreeArguments(nn.Module):
    """``model(x, t, y)`` as Pyro's CEVAE takes its data: z ~ N(0, 1), x | z ~ N(w z, I) and
    y | z, t ~ N(v z + beta t, 1) observed, t an input. With u = (w, v),

        log p(x, y | t) = log N((x, y); (0, beta t), I + u u^T),

    and the guide q(z | x, t, y) = N(a^T x + a_y y + a_t t + b, s) contains the exact
    posterior."""

    def __init__(self, w, v=1.5, beta=2.0):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("v", torch.tensor(v))
        self.register_buffer("beta", torch.tensor(beta))
        self.a = nn.Parameter(torch.zeros(len(w)))
        self.a_y, self.a_t = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.b, self.log_s = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def model(self, x, t, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)
            pyro.sample("y", dist.Normal(self.v * z + self.beta * t, 1.0), obs=y)

    def guide(self, x, t, y):
        with pyro.plate("data", x.shape[0]):
            loc = x @ self.a + self.a_y * y + self.a_t * t + self.b
            pyro.sample("z", dist.Normal(loc, self.log_s.exp()))

    def draws(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, generator=g)
        t = torch.bernoulli(torch.full((n,), 0.5), generator=g)
        x = z.unsqueeze(-1) * self.w + torch.randn(n, len(self.w), generator=g)
        return x, t, self.v * z + self.beta * t + torch.randn(n, generator=g)

    def log_marginal(self, x, t, y):
        u = torch.cat([self.w, self.v.reshape(1)])
        cov = torch.eye(len(u)) + torch.outer(u, u)
        loc = torch.cat([torch.zeros_like(x), (self.beta * t).unsqueeze(-1)], -1)
        return dist.MultivariateNormal(loc, cov).log_prob(torch.cat([x, y.unsqueeze(-1)], -1))


def test_three_data_arguments_train_and_evaluate():
    w, _ = linear_gaussian_data()
    model = ThreeArguments(w)
    x, t, y = model.draws(300, seed=0)
    fit(model, x, t, y, num_epochs=60, batch_size=50, optim=Adam(0.05, schedule=ExponentialLR(0.97)),
        loss=ReparamELBO(num_particles=4), seed=0, progress=False)
    x, t, y = model.draws(100, seed=1)
    exact = model.log_marginal(x, t, y)
    iw = iw_log_likelihood(model, x, c=(t, y), num_samples=500, seed=0)
    diff = iw.per_datapoint - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()
    terms = elbo_terms(model, x, c=(t, y), num_samples=50)
    gap = exact - terms.elbo  # KL(q || p(z | x, y, t)) >= 0, small for a near-exact guide
    se = gap.std() / len(gap) ** 0.5
    assert -3 * se < gap.mean() < 3 * se + 0.02, (gap.mean(), se)
    # observed=("x",): log p(x | t) = log N(x; 0, I + w w^T), y marginalized (a leaf)
    only_x = iw_log_likelihood(model, x, c=(t, y), num_samples=2000, seed=0, observed=("x",))
    diff = only_x.per_datapoint - exact_log_marginal(w, x)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()
    assert (only_x.per_datapoint - iw.per_datapoint).mean() > 1.0  # not log p(x, y | t)
    terms_x = elbo_terms(model, x, c=(t, y), num_samples=50, observed="x")
    d = only_x.per_datapoint - terms_x.elbo  # log p(x | t) - ELBO >= 0 on average
    assert d.mean() > -3 * d.std() / len(d) ** 0.5
    with pytest.raises(ValueError, match=r"observed sites \['x', 'y'\], got \['w'\]"):
        iw_log_likelihood(model, x, c=(t, y), num_samples=2, observed=("w",))
    # a Dataset of (x, t, y) tuples, streamed through a DataLoader, trains the same program
    streamed = ThreeArguments(w)
    fit(streamed, TensorDataset(*model.draws(300, seed=0)), num_epochs=60, batch_size=50,
        optim=Adam(0.05, schedule=ExponentialLR(0.97)), loss=ReparamELBO(num_particles=4), seed=0,
        progress=False)
    diff = iw_log_likelihood(streamed, x, c=(t, y), num_samples=500, seed=0).per_datapoint - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()
    with pytest.raises(TypeError, match=r"c=: it moved to the positional arguments"):
        fit(model, x, c=(t, y), num_epochs=1)
    with pytest.raises(ValueError, match=r"pass val=\(x_val, \*args\)"):  # before any training
        fit(model, x, t, y, val=x, num_epochs=1, progress=False)
    with pytest.raises(ValueError, match="c has 99 rows but x has 100"):
        iw_log_likelihood(model, x, c=(t, y[:99]), num_samples=2)


def test_posterior_tools_find_the_data_plate_whatever_its_name():
    """NUTS, the guide's draws and the inference gap on the "batch"-plate model with the exact
    posterior as guide: N(w.x / (1 + |w|^2), 1 / (1 + |w|^2)) per datapoint."""
    w, x = linear_gaussian_data(n=3)
    model = BatchPlate(w)
    precision = 1 + w @ w
    with torch.no_grad():
        model.a.copy_(w / precision)
        model.log_s.fill_(-0.5 * precision.log())
    mean, sd = x @ w / precision, precision ** -0.5
    nuts = nuts_posterior(model, x, num_samples=300, warmup_steps=200, num_chains=2, seed=0)
    draws = nuts.draws["z"]  # (chains, draws, N)
    assert draws.shape == (2, 300, 3)
    # 600 correlated draws: a conservative ESS of 100 gives an SE of sd / 10
    assert (draws.mean((0, 1)) - mean).abs().max() < 4 * sd / 10
    guide = guide_samples(model, x, num_samples=4000, seed=0).draws["z"]
    assert guide.shape == (1, 4000, 3)
    assert (guide.mean((0, 1)) - mean).abs().max() < 4 * sd / 4000 ** 0.5
    gap = inference_gap(model, x, num_steps=20, num_elbo_samples=200, num_samples=200)
    # the guide is exact: log p(x) and both ELBOs are log p(x), to Monte Carlo error
    exact = exact_log_marginal(w, x).double()
    assert torch.allclose(gap.elbo_amortized, exact, atol=1e-4)
    # the refined guide moved off the optimum by its noisy steps only: IW still ~exact
    assert torch.allclose(gap.log_likelihood, exact, atol=1e-2)


class FeaturePlate(nn.Module):
    """z ~ N(0, 1), x_d | z ~ N(w_d z, 1) with the features in a plate of their own: with
    mini-batches as wide as the features, two plates have the batch's size."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)
        self.a = nn.Parameter(torch.zeros(len(w)))
        self.log_s = nn.Parameter(torch.zeros(()))

    def model(self, x):
        with pyro.plate("batch", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0))
            with pyro.plate("features", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z * self.w, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("batch", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal((x @ self.a).unsqueeze(-1), self.log_s.exp()))


def test_an_ambiguous_data_plate_is_named_in_fit():
    w, x = linear_gaussian_data(n=200)  # 3 features: batches of 3 make both plates size 3
    with pytest.raises(ValueError, match="data_plate="):
        fit(FeaturePlate(w), x, loss=IWAE(2), batch_size=3, num_epochs=1, progress=False)
    model = FeaturePlate(w)
    fit(model, x, loss=IWAE(4, data_plate='batch'), batch_size=3, num_epochs=3, optim=Adam(0.02), seed=0,
        progress=False)
    x_test = linear_gaussian_draws(w, 60, seed=1)
    iw = iw_log_likelihood(model, x_test, num_samples=500, seed=0, data_plate="batch")
    diff = iw.per_datapoint - exact_log_marginal(w, x_test)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()


def test_a_size_one_plate_beside_the_data_plate_is_not_taken_for_it():
    """On one datapoint a one-feature plate has the batch's size too; the layout is then found
    on the first pass instead of asking for data_plate=."""
    w, _ = linear_gaussian_data(n=10)
    w = w[:1]
    x = linear_gaussian_draws(w, 60, seed=1)
    model = FeaturePlate(w)
    with torch.no_grad():  # the exact posterior: z | x ~ N(w x / (1 + w^2), 1 / (1 + w^2))
        model.a.copy_(w / (1 + w.square()))
        model.log_s.fill_(-0.5 * torch.log1p(w.square()).item())
    iw = iw_log_likelihood(model, x, num_samples=20, seed=0)
    torch.testing.assert_close(iw.per_datapoint, exact_log_marginal(w, x), atol=1e-4, rtol=0)
