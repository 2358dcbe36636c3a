"""Gradient unbiasedness for the model's parameters as well as the guide's, and for the neural
baseline: the mean of many independent gradient estimates against the exact gradient of the
ELBO, on two tiny models with learnable model parameters (Pyro params and ``nn.Module``s
registered with ``pyro.module``, as Pyro's examples write them):

- a discrete latent z in {0, 1, 2} with learnable prior logits and a linear decoder of its
  one-hot code, and an encoder of x for q(z | x): the exact ELBO is a sum over the three values;
- a linear-Gaussian model x | z ~ N(a z + b, s^2) with learnable a, b, s and a Gaussian guide:
  the exact ELBO is in closed form.

Each estimate averages P vectorized particles; R independent estimates give the standard error
of their mean from their own spread (not from the estimate under test), and every coordinate of
the mean must lie within Z standard errors of the exact gradient. With R = 40 the mean's
t-statistic has 39 degrees of freedom: P(|t| > 5) is about 1e-5 per coordinate, so even the
193 coordinates of the baseline network leave a false alarm below 0.3% (Bonferroni); the seeds
are fixed, so the outcome is deterministic."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pvae.inference import ReparamELBO, ScoreFunctionELBO

R, Z = 40, 5.0  # independent estimates per test; standard errors allowed per coordinate
X = torch.tensor([[0.9], [-1.2], [0.3], [2.0]], dtype=torch.float64)
SIGMA = 0.8  # the discrete model's observation noise


def seeded(module: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    """``module`` in float64 with weights drawn from N(0, scale^2) under a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


class Discrete:
    """z ~ Categorical(softmax(pi)), x | z ~ N(decoder(onehot(z)), SIGMA^2);
    q(z | x) = Categorical(softmax(encoder(x)))."""

    def __init__(self):
        self.decoder = seeded(nn.Linear(3, 1), 1, 1.5)
        self.encoder = seeded(nn.Linear(1, 3), 2)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        pi = pyro.param("prior_logits", torch.tensor([0.3, -0.2, 0.1], dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=pi))
            mean = self.decoder(nn.functional.one_hot(z, 3).to(x.dtype)).squeeze(-1)
            pyro.sample("x", dist.Normal(mean, SIGMA), obs=x.squeeze(-1))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=self.encoder(x)))

    def params(self):
        """Model parameters first, then the guide's."""
        return [pyro.param("prior_logits").unconstrained(), *self.decoder.parameters(),
                *self.encoder.parameters()]

    def costs(self):
        """``(q, cost)``, both ``(N, 3)``: q(z | x_n) and log p(z) + log p(x_n | z) - log q(z |
        x_n) for each of the three values of z, differentiable in every parameter."""
        log_prior = torch.log_softmax(pyro.param("prior_logits"), -1)
        means = self.decoder(torch.eye(3, dtype=X.dtype)).squeeze(-1)  # (3,)
        log_lik = dist.Normal(means, SIGMA).log_prob(X)  # (N, 3)
        log_q = torch.log_softmax(self.encoder(X), -1)
        return log_q.exp(), log_prior + log_lik - log_q

    def exact_elbo(self):
        q, cost = self.costs()
        return (q * cost).sum()


class Gaussian:
    """z ~ N(0, 1), x | z ~ N(a z + b, s^2) with (a, b) a ``pyro.module`` decoder and log s a
    Pyro param; q(z | x) = N(c x + d, exp(log_t)^2) with Pyro params."""

    def __init__(self):
        self.decoder = nn.Linear(1, 1).double()
        with torch.no_grad():
            self.decoder.weight.fill_(1.3)
            self.decoder.bias.fill_(-0.4)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        log_s = pyro.param("log_s", torch.tensor(-0.2, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), log_s.exp()).to_event(1), obs=x)

    def guide(self, x):
        c = pyro.param("c", torch.tensor(0.4, dtype=x.dtype))
        d = pyro.param("d", torch.tensor(0.1, dtype=x.dtype))
        log_t = pyro.param("log_t", torch.tensor(-0.5, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(c * x + d, log_t.exp()).to_event(1))

    def params(self):
        return [*self.decoder.parameters(),
                *(pyro.param(k).unconstrained() for k in ("log_s", "c", "d", "log_t"))]

    def exact_elbo(self):
        a, b = self.decoder.weight.squeeze(), self.decoder.bias.squeeze()
        s2 = torch.exp(2 * pyro.param("log_s"))
        m, v = pyro.param("c") * X + pyro.param("d"), torch.exp(2 * pyro.param("log_t"))
        log_lik = -0.5 * torch.log(2 * math.pi * s2) - ((X - a * m - b) ** 2 + a**2 * v) / (2 * s2)
        log_prior = -0.5 * math.log(2 * math.pi) - (m**2 + v) / 2
        entropy = 0.5 * torch.log(2 * math.pi * math.e * v)
        return (log_lik + log_prior + entropy).sum()


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def estimates(toy, loss, params=None, n=R):
    """``(n, D)``: n independent estimates of the gradient of the ELBO (minus the surrogate's
    gradient) w.r.t. ``params`` (the toy's by default)."""
    out = []
    for _ in range(n):
        _, surrogate = loss(toy.model, toy.guide, X)
        out.append(-flat_grad(surrogate, params or toy.params()))
    return torch.stack(out)


def assert_unbiased(g, exact):
    """Every coordinate of the mean of the rows of ``g`` within Z of their standard errors of
    ``exact``; the standard error comes from the rows' spread."""
    se = g.std(0) / math.sqrt(len(g))
    assert (se > 0).all(), se  # every coordinate gets a stochastic gradient
    t = (g.mean(0) - exact) / se
    assert t.abs().max() < Z, (t, g.mean(0), exact, se)


def neural_score_loss(toy, particles):
    """The score-function ELBO with its neural baseline built (on a first call) and set to
    fixed weights whose output is of the size of the costs, so that the baseline matters."""
    loss = ScoreFunctionELBO(num_particles=particles, baseline="neural")
    loss(toy.model, toy.guide, X)
    net = seeded(loss.nets["z"], 3, 0.7)
    with torch.no_grad():
        net[-1].bias.fill_(-2.0)
    return loss, net


LOSSES = {
    "score": lambda toy, P: ScoreFunctionELBO(num_particles=P),
    "score-average": lambda toy, P: ScoreFunctionELBO(num_particles=P, baseline="average"),
    "score-neural": lambda toy, P: neural_score_loss(toy, P)[0],
    "reparam": lambda toy, P: ReparamELBO(num_particles=P),
    "reparam-analytic-kl": lambda toy, P: ReparamELBO(num_particles=P, analytic_kl=True),
    "reparam-captured-path": lambda toy, P: _capturable(ReparamELBO(num_particles=P)),
}


def _capturable(loss):
    loss.capturable_()  # the host-sync-free path a CUDA graph captures, pvae's own sum
    return loss


@pytest.mark.parametrize("name", ["score", "score-average", "score-neural"])
def test_score_function_gradient_unbiased_discrete(name):
    """Model parameters (prior logits, decoder) and guide parameters (encoder) of a discrete
    latent: the exact ELBO by summing over z."""
    toy = Discrete()
    g = estimates(toy, LOSSES[name](toy, 200))
    assert_unbiased(g, flat_grad(toy.exact_elbo(), toy.params()))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_unbiased_gaussian(name):
    """Model parameters (decoder a, b; log s) and guide parameters (c, d, log t): the exact
    ELBO in closed form."""
    toy = Gaussian()
    g = estimates(toy, LOSSES[name](toy, 200 if name.startswith("score") else 20))
    assert_unbiased(g, flat_grad(toy.exact_elbo(), toy.params()))


def test_neural_baseline_trained_on_its_expected_squared_error():
    """The baseline network's own gradient is unbiased for that of its objective,
    sum_n E_q[(cost_n - b(x_n))^2] with cost_n = log p(x_n, z) - log q(z | x_n) (the whole
    downstream cost of z), held fixed: the exact expectation by summing over z."""
    toy = Discrete()
    loss, net = neural_score_loss(toy, 200)
    params = list(net.parameters())
    g = -estimates(toy, loss, params)  # the surrogate's own gradient: the network descends it
    q, cost = (t.detach() for t in toy.costs())
    b = net(X)  # (N, 1)
    exact = flat_grad((q * (cost - b) ** 2).sum(), params)
    assert_unbiased(g, exact)


def test_neural_baseline_changes_the_draws_spread_not_their_mean():
    """With the same draws, the neural baseline moves every single estimate of the guide's
    gradient (so the baseline is really used) while the model's gradient, which takes no score
    term, stays exactly as without it."""
    toy = Discrete()
    loss, _ = neural_score_loss(toy, 50)
    plain = ScoreFunctionELBO(num_particles=50)
    plain(toy.model, toy.guide, X)  # its first call traces the programs (draws) once
    pyro.set_rng_seed(7)
    with_baseline = estimates(toy, loss, n=3)
    pyro.set_rng_seed(7)
    without = estimates(toy, plain, n=3)
    n_model = 3 + 3 + 1  # prior logits, decoder weight and bias
    assert torch.allclose(with_baseline[:, :n_model], without[:, :n_model], atol=1e-12)
    assert ((with_baseline[:, n_model:] - without[:, n_model:]).abs() > 1e-6).all()
