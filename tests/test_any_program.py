"""Pyro programs as Pyro users write them (issue 13): a model that does not broadcast over a
vectorized particle dim is evaluated one particle at a time, against the closed form of a
linear-Gaussian model (log p(x) = log N(x; 0, I + w w^T))."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.inference import elbo_terms, iw_log_likelihood, log_weights


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
