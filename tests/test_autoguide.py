"""AutoAmortizedNormal: the automatic amortized guide, checked against PPCA's exact posterior
(Tipping & Bishop 1999), against a hand-written guide on digits, and on site shapes that
a guide must reproduce (inner plates, constrained supports, global latents)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pvae import data
from pvae.inference import AutoAmortizedNormal, ReparamELBO, elbo_terms, iw_log_likelihood
from pvae.models import PPCA
from pvae.nn import MLP
from pvae.train import Adam, ExponentialLR, fit


class Program(nn.Module):
    """A model program with an AutoAmortizedNormal guide: the object fit and evaluation take."""

    def __init__(self, model, **kwargs):
        super().__init__()
        self._model = model
        self.guide = AutoAmortizedNormal(model, **kwargs)

    def model(self, *args):
        return self._model(*args)


def ppca_data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 2, generator=g)
    return torch.randn(n, 2, generator=g) @ W.T + 1.0 + 0.5 * torch.randn(n, 6, generator=g)


def test_full_covariance_head_recovers_exact_ppca_posterior():
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = ppca_data()
    ppca = PPCA.closed_form(x, 2, guide="full")  # maximum-likelihood W, mu, sigma
    ppca.requires_grad_(False).eval()  # fixed: only the guide trains
    program = Program(ppca.model, hidden_dims=(), covariance="full")
    # full batches and 16 particles: little gradient noise around the optimum
    fit(program, x, num_epochs=300, batch_size=400, optim=Adam(0.05, schedule=ExponentialLR(0.99)),
        loss=ReparamELBO(num_particles=16), seed=0, progress=False)
    x_test = ppca_data(100, seed=1)
    exact = ppca.exact_posterior(x_test)
    with torch.no_grad():
        h = program.guide.encoder(x_test)
        out = program.guide.heads["z"](h)
    sd = exact.variance.sqrt()
    err = (out[:, :2] - exact.mean) / sd  # the guide's mean, in posterior sds
    assert err.abs().max() < 0.1, err.abs().max()  # measured 0.03: the optimizer's jitter
    # the exact family: the ELBO equals log p(x) up to Monte Carlo error
    terms = elbo_terms(program, x_test, num_samples=200)
    gap = ppca.log_marginal(x_test) - terms.elbo
    se = gap.std() / math.sqrt(len(gap))
    assert abs(gap.mean()) < 3 * se + 0.01, (gap.mean(), se)


class ContrastVAE(nn.Module):
    """Binary images with a Normal code z and a LogNormal per-image contrast s:
    x ~ Bernoulli(logits = s * f(z)). ``guide`` is hand-written (the reference)."""

    def __init__(self, x_dim=64, latent_dim=4, hidden=64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = MLP(latent_dim, (hidden,), x_dim, "tanh")
        self.encoder = nn.Sequential(MLP(x_dim, (), hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * latent_dim + 2))

    def model(self, x):
        pyro.module("contrast_vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), self.latent_dim), 1.0)
                            .to_event(1))
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(len(x)), 0.5))
            pyro.sample("x", dist.Bernoulli(logits=s.unsqueeze(-1) * self.decoder(z)).to_event(1),
                        obs=x)

    def guide(self, x):
        pyro.module("contrast_vae", self)
        out = self.encoder(x)
        q = self.latent_dim
        scale = nn.functional.softplus(out[:, q:2 * q]) + 1e-4
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(out[:, :q], scale).to_event(1))
            pyro.sample("s", dist.LogNormal(out[:, 2 * q], nn.functional.softplus(out[:, -1])
                                            + 1e-4))


class AutoContrastVAE(ContrastVAE):
    """The same model, its guide AutoAmortizedNormal with the same trunk width."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.encoder
        self.auto = AutoAmortizedNormal(self.model, hidden_dims=(64,))

    def guide(self, x):
        return self.auto(x)


def test_auto_guide_matches_hand_written_on_digits():
    ds = data.load("digits", binarize="static")
    results = {}
    for cls in (ContrastVAE, AutoContrastVAE):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = cls()
        fit(model, ds.x_train, num_epochs=20, batch_size=64, optim=Adam(3e-3), seed=0, progress=False)
        pyro.set_rng_seed(0)
        results[cls.__name__] = iw_log_likelihood(model, ds.x_test, num_samples=200)
    hand, auto = results["ContrastVAE"], results["AutoContrastVAE"]
    diff = auto.per_datapoint - hand.per_datapoint
    assert abs(diff.mean()) < 1.0, (auto.mean, hand.mean)
    assert math.isfinite(auto.mean) and auto.mean > -64 * math.log(2)  # beats coin flips
    # the guide's sites: a LogNormal s (a transformed Normal on the positive reals)
    site = pyro.poutine.trace(model.auto).get_trace(ds.x_test[:3]).nodes["s"]
    assert (site["value"] > 0).all() and site["value"].shape == (3,)


class Shapes:
    """Latent sites of several shapes: an inner plate, a simplex, a global scale."""

    def model(self, x):
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-2):
            w = pyro.sample("w", dist.Dirichlet(x.new_ones(x.shape[0], 1, 3)))
            with pyro.plate("cells", 4, dim=-1):
                u = pyro.sample("u", dist.Normal(x.new_zeros(x.shape[0], 4), 1.0))
                loc = u + w[..., 0] * tau
                pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def test_site_shapes_supports_and_global_latents():
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    guide = AutoAmortizedNormal(Shapes().model, hidden_dims=(8,))
    values = guide(x)
    assert values["u"].shape == (5, 4) and values["w"].shape == (5, 1, 3)
    assert torch.allclose(values["w"].sum(-1), torch.ones(5, 1)) and (values["w"] > 0).all()
    assert values["tau"].shape == () and values["tau"] > 0
    tr = pyro.poutine.trace(guide).get_trace(x)
    assert [f.name for f in tr.nodes["u"]["cond_indep_stack"]] == ["data", "cells"]
    assert tr.nodes["w"]["fn"].event_shape == (3,)
    # the heads: u has 4 coordinates per datapoint, w 2 (the simplex's unconstrained shape)
    assert guide.heads["u"].out_features == 8 and guide.heads["w"].out_features == 4
    # trains with pyro's SVI and with fit (the global tau through AutoNormal)
    pyro.clear_param_store()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    svi = pyro.infer.SVI(Shapes().model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    after = dict(pyro.get_param_store().items())
    assert after and set(after) > set(before)  # the heads and tau's AutoNormal registered params
    head = next(p for n, p in guide.named_parameters() if "heads" in n)
    head_before = head.detach().clone()
    svi.step(x)
    assert not torch.equal(head.detach(), head_before)  # the encoder head moved under SVI
    program = type("P", (), {"model": staticmethod(Shapes().model), "guide": guide})()
    history = fit(program, torch.randn(40, 4), num_epochs=2, batch_size=20, seed=0,
                  progress=False)
    assert all(math.isfinite(v) for v in history.column("train_elbo"))
    # another batch size works (the data plate follows the batch)
    assert guide(torch.randn(7, 4))["u"].shape == (7, 4)


def test_refusals():
    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(x.new_full((len(x),), 0.5)))
            pyro.sample("x", dist.Normal(k, 1.0), obs=x[:, 0])

    with pytest.raises(ValueError, match="latent site 'k' is discrete.*ScoreFunctionELBO"):
        AutoAmortizedNormal(discrete)(torch.randn(3, 2))

    def only_global(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[:, 0])

    with pytest.raises(ValueError, match="no latent site inside pyro.plate"):
        AutoAmortizedNormal(only_global)(torch.randn(3, 2))
    with pytest.raises(ValueError, match="covariance='full' needs latent sites without plates"):
        AutoAmortizedNormal(Shapes().model, covariance="full")(torch.randn(3, 4))
    with pytest.raises(ValueError, match="covariance"):
        AutoAmortizedNormal(discrete, covariance="low-rank")
    with pytest.raises(TypeError, match="callable"):
        AutoAmortizedNormal(object())


def test_data_plate_of_any_name_is_found():
    """A linear-Gaussian model whose plate is named "batch" (Pyro's scanVI style): the guide
    finds the plate, amortizes z, and the IW estimate matches log N(x; 0, I + w w^T)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)

    def model(x):
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * w, 1.0).to_event(1), obs=x)

    def draws(n):
        return torch.randn(n, 1, generator=g) * w + torch.randn(n, 3, generator=g)

    program = Program(model, hidden_dims=())
    fit(program, draws(300), num_epochs=40, batch_size=50, optim=Adam(0.05), seed=0, progress=False)
    assert program.guide.data_plate == "batch"
    x_test = draws(100)
    exact = dist.MultivariateNormal(torch.zeros(3), torch.eye(3) + torch.outer(w, w)).log_prob(
        x_test)
    diff = iw_log_likelihood(program, x_test, num_samples=500, seed=0).per_datapoint - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()
