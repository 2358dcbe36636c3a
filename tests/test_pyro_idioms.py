"""Pyro idioms (issue 26): programs written the way Pyro's examples and tutorials write them,
each checked against a closed form or against Pyro's own ``Trace_ELBO`` / ``TraceEnum_ELBO`` on
the same draws.

======================================  ================================================
idiom                                   test
======================================  ================================================
masked latents (``.mask``, sequences)   test_masks_travel_to_the_autoguide
integer data                            test_integer_data_give_floating_point_results
``Delta`` guide (MAP)                   test_a_delta_guide_is_refused
index argument beside x                 test_the_encoder_reads_x_alone_by_default
``subsample_size`` / guide subsampling  test_history_units_when_the_program_subsamples
======================================  ================================================
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta
from torch import nn

from pvae.inference import AutoAmortizedNormal, elbo_terms, iw_log_likelihood
from pvae.train import fit


def linear_gaussian_log_marginal(w, x):
    """log N(x; 0, I + w w^T) over the last dim: z ~ N(0, 1), x | z ~ N(w z, I)."""
    cov = torch.eye(len(w), dtype=w.dtype) + torch.outer(w, w)
    return dist.MultivariateNormal(torch.zeros(len(w), dtype=w.dtype), cov).log_prob(x)


# ---------------------------------------------------------------------------------------------
# Masked latent sites: variable-length sequences, as in Pyro's DMM example (per-step sites in
# pyro.markov, masked with .mask(...) beyond each sequence's length)


class Sequences(nn.Module):
    """z_nt ~ N(0, 1), x_nt | z_nt ~ N(w z_nt, I) for t < length_n, both masked beyond it:

        log p(x_n) = sum_{t < length_n} log N(x_nt; 0, I + w w^T).

    ``model(x, lengths)`` with x padded to ``(N, T, D)``; the guide is AutoAmortizedNormal."""

    def __init__(self, w, num_steps):
        super().__init__()
        self.register_buffer("w", w)
        self.num_steps = num_steps
        self.guide = AutoAmortizedNormal(self.model, hidden_dims=())

    def model(self, x, lengths):
        mask = torch.arange(x.size(1), device=x.device) < lengths.unsqueeze(-1)  # (N, T)
        with pyro.plate("sequences", x.size(0)):
            for t in pyro.markov(range(self.num_steps)):
                z = pyro.sample(f"z_{t}", dist.Normal(x.new_zeros(x.size(0)), 1.0)
                                .mask(mask[:, t]))
                pyro.sample(f"x_{t}", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1)
                            .mask(mask[:, t]), obs=x[:, t])

    def exact_guide_(self, x, lengths):
        """Set the guide's linear heads to the exact posterior of every step,
        z_nt | x_nt ~ N(w.x_nt / (1 + |w|^2), 1 / (1 + |w|^2))."""
        self.guide(x, lengths)  # built on the first call
        precision = 1 + self.w @ self.w
        d = len(self.w)
        with torch.no_grad():
            for t in range(self.num_steps):
                head = self.guide.heads[f"z_{t}"]
                head.weight.zero_()
                head.weight[0, t * d:(t + 1) * d] = self.w / precision
                head.bias[0] = 0.0
                sd = precision ** -0.5 - 1e-4  # softplus(bias) + MIN_SCALE = the posterior sd
                head.bias[1] = torch.log(torch.expm1(sd))

    def log_marginal(self, x, lengths):
        lp = linear_gaussian_log_marginal(self.w, x)  # (N, T)
        mask = torch.arange(x.size(1)) < lengths.unsqueeze(-1)
        return (lp * mask).sum(-1)


def sequence_data(n=30, num_steps=6, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    lengths = torch.randint(1, num_steps + 1, (n,), generator=g)
    x = torch.randn(n, num_steps, 1, generator=g) * w + torch.randn(n, num_steps, d, generator=g)
    x = x * (torch.arange(num_steps) < lengths.unsqueeze(-1)).unsqueeze(-1)  # zero padding
    return w, x, lengths


def test_masks_travel_to_the_autoguide():
    """With the exact posterior in every valid step and the model's masks on the guide's
    sites, every log weight is log p(x_n): IW (any K) and the ELBO are the closed form to
    rounding, and so is Pyro's Trace_ELBO on the same program. Unmasked guide sites would add
    the entropy of every padded step (IW rising with K, ELBO far above log p(x))."""
    w, x, lengths = sequence_data()
    model = Sequences(w, x.size(1))
    model.exact_guide_(x, lengths)
    exact = model.log_marginal(x, lengths)
    iw = iw_log_likelihood(model, x, c=lengths, num_samples=50, seed=0)
    torch.testing.assert_close(iw.per_datapoint, exact, atol=1e-3, rtol=0)
    terms = elbo_terms(model, x, c=lengths, num_samples=4)
    torch.testing.assert_close(terms.elbo, exact, atol=1e-3, rtol=0)
    loss = pyro.infer.Trace_ELBO().loss(model.model, model.guide, x, lengths)
    assert loss == pytest.approx(-exact.sum().item(), abs=1e-2)


# ---------------------------------------------------------------------------------------------
# Integer data


class PoissonGamma:
    """z ~ Gamma(a, b), x_d | z ~ Poisson(z), d = 1..D, counts as int64; the guide is the exact
    posterior Gamma(a + sum x, b + D), so every log weight is the negative-binomial closed form

        log p(x) = lgamma(a + S) - lgamma(a) + a log b - (a + S) log(b + D) - sum lgamma(x_d + 1).
    """

    a, b = 2.0, 0.5

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(torch.full((x.shape[0],), self.a),
                                            torch.full((x.shape[0],), self.b)))
            rate = z.unsqueeze(-1).expand(*z.shape, x.shape[-1])
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(self.a + x.sum(-1), self.b + x.shape[-1]))

    def log_marginal(self, x):
        s, d = x.sum(-1).double(), x.shape[-1]
        a, b = self.a, self.b
        return (torch.lgamma(a + s) - math.lgamma(a) + a * math.log(b) - (a + s) * math.log(b + d)
                - torch.lgamma(x.double() + 1).sum(-1))


def test_integer_data_give_floating_point_results():
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((5, 4), 3.0), generator=g).long()
    model = PoissonGamma()
    iw = iw_log_likelihood(model, x, num_samples=20, seed=0)
    assert iw.per_datapoint.is_floating_point()
    torch.testing.assert_close(iw.per_datapoint.double(), model.log_marginal(x), atol=1e-4,
                               rtol=0)
    terms = elbo_terms(model, x, num_samples=2)
    assert terms.elbo.is_floating_point()
    torch.testing.assert_close(terms.elbo.double(), model.log_marginal(x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Delta guides


class LinearGaussian(nn.Module):
    """z ~ N(0, 1), x | z ~ N(w z, I) in pyro.plate("data")."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_a_delta_guide_is_refused():
    """A point mass has no density: no importance weight, no KL. Pyro's AutoDelta (MAP) is
    refused by evaluation, naming the site."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = torch.randn(20, 3, generator=g)
    model = LinearGaussian(w)
    model.guide = AutoDelta(model.model)
    with pytest.raises(ValueError, match="'z'.*Delta.*no density"):
        iw_log_likelihood(model, x, num_samples=10)
    with pytest.raises(ValueError, match="'z'.*Delta.*no density"):
        elbo_terms(model, x)


# ---------------------------------------------------------------------------------------------
# AutoAmortizedNormal encodes x alone unless told otherwise


class Indexed(nn.Module):
    """The linear-Gaussian model over a data set of ``num_data`` datapoints, mini-batches
    picked by indices passed beside x (``pyro.plate("data", N, subsample=idx)``), and an
    AutoAmortizedNormal guide."""

    def __init__(self, w, num_data):
        super().__init__()
        self.register_buffer("w", w)
        self.num_data = num_data
        self.guide = AutoAmortizedNormal(self.model, hidden_dims=(8,))

    def model(self, x, idx):
        with pyro.plate("data", self.num_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_the_encoder_reads_x_alone_by_default():
    """The indices say which datapoints the batch holds, not what they are: q(z | x) must not
    change when the same rows are numbered otherwise."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = torch.randn(20, 3, generator=g)
    idx = torch.arange(20)
    model = Indexed(w, 2000)
    a = iw_log_likelihood(model, x, c=idx, num_samples=10, seed=0)
    b = iw_log_likelihood(model, x, c=idx + 1000, num_samples=10, seed=0)
    torch.testing.assert_close(a.per_datapoint, b.per_datapoint)
    assert model.guide.encoder[0].net[0].in_features == 3  # x's width alone


# ---------------------------------------------------------------------------------------------
# Units when the program subsamples itself


class Subsampled(nn.Module):
    """The linear-Gaussian model with the exact posterior as guide, and a data plate that the
    program subsamples itself: ``"model"`` (``subsample_size`` in the model's and the guide's
    plate, Pyro's usual mini-batching) or ``"guide"`` (the guide draws the subsample, the
    model's plate replays it)."""

    def __init__(self, w, subsample_size, where="model"):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.subsample_size, self.where = subsample_size, where

    def model(self, x):
        size = self.subsample_size if self.where == "model" else None
        with pyro.plate("data", x.shape[0], subsample_size=size) as idx:
            batch = x[idx]
            z = pyro.sample("z", dist.Normal(batch.new_zeros(len(idx)), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=batch)

    def guide(self, x):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            pyro.sample("z", dist.Normal(x[idx] @ self.w / precision, precision ** -0.5))


@pytest.mark.parametrize("where", ["model", "guide"])
@pytest.mark.parametrize("batch_size", [120, 60])
def test_history_units_when_the_program_subsamples(where, batch_size):
    """Every row of the data is the same x, so the exact-posterior guide makes every
    datapoint's ELBO log p(x): the history per datapoint is log p(x) to rounding whichever rows
    the program subsamples (full batches of 120, or pvae's mini-batches of 60 subsampled again
    by the program), and equals -Trace_ELBO().loss / (datapoints in the plate)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = (torch.randn(1, 3, generator=g) + w).expand(120, 3).contiguous()
    model = Subsampled(w, 16, where)
    exact = linear_gaussian_log_marginal(w, x[:1]).item()
    loss = pyro.infer.Trace_ELBO().loss(model.model, model.guide, x)
    assert -loss / len(x) == pytest.approx(exact, abs=1e-4)
    history = fit(model, x, num_epochs=2, batch_size=batch_size, lr=1e-8, seed=0, progress=False)
    for value in history.column("train_elbo"):
        assert value == pytest.approx(exact, abs=1e-4), (value, exact)
