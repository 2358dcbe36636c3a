"""VIMCO (Mnih & Rezende 2016), the estimator added as one class: its gradient against the exact
gradient of E[L_K] by full enumeration of a small discrete model, within standard errors, and
its gradient variance against the single-sample score-function ELBO with the average baseline
on the sigmoid belief net of the estimator tests."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.inference import VIMCO, ScoreFunctionELBO, gradient_variance
from pvae.train import fit

K, L, D = 3, 2, 3  # particles, binary latents per datapoint, observed width
X = torch.tensor([[0.9, -0.4, 1.3], [-1.1, 0.6, 0.2]], dtype=torch.float64)


class TinyDiscrete:
    """z ~ Bernoulli(sigmoid(theta))^L, x | z ~ N(W z + b, I); q(z | x) = Bernoulli(sigmoid(A x
    + c))^L, written as Pyro's examples write a model and guide with parameters."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        make = lambda *shape: (0.5 * torch.randn(*shape, generator=g,  # noqa: E731
                                                 dtype=torch.float64)).requires_grad_()
        self.theta, self.W, self.b = make(L), make(D, L), make(D)
        self.A, self.c = make(L, D), make(L)
        self.params = [self.theta, self.W, self.b, self.A, self.c]

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=self.theta.expand(x.shape[0], L))
                            .to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=x @ self.A.T + self.c).to_event(1))

    def exact_bound(self, x):
        """E_{z_1..K ~ q}[log (1/K) sum_k p(x, z_k) / q(z_k | x)], summed over the datapoints,
        by enumerating all (2^L)^K particle tuples: differentiable in every parameter."""
        states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=L)), dtype=x.dtype)
        q = dist.Bernoulli(logits=x @ self.A.T + self.c).to_event(1)  # batch (N,)
        log_q = q.log_prob(states[:, None])  # (S, N)
        log_p = (dist.Bernoulli(logits=self.theta).to_event(1).log_prob(states)[:, None]
                 + dist.Normal(states @ self.W.T + self.b, 1.0).to_event(1)
                 .log_prob(x[:, None]).T)  # (S, N)
        log_w = log_p - log_q
        total = 0.0
        for tup in itertools.product(range(len(states)), repeat=K):
            idx = list(tup)
            prob = log_q[idx].sum(0).exp()  # (N,)
            bound = torch.logsumexp(log_w[idx], 0) - math.log(K)
            total = total + (prob * bound).sum()
        return total


def _gradients(program, estimate, num_calls, replicas):
    """``num_calls`` gradient estimates, each the mean over ``replicas`` copies of X (every copy
    draws its own particles): independent estimates of the gradient for X, in one trace each."""
    x = X.repeat(replicas, 1)
    out = []
    for _ in range(num_calls):
        grads = torch.autograd.grad(estimate(x), program.params)
        out.append(torch.cat([g.flatten() for g in grads]) / replicas)
    return torch.stack(out)


def test_vimco_gradient_is_unbiased_against_enumeration():
    """Every parameter (the model's prior and likelihood, the guide's) within 4 standard errors
    of the exact gradient of E[L_K], over 60 estimates that each average 100 independent ones;
    the value is E[L_K] within 4 standard errors. The estimator without its score term (the
    pathwise part alone) is detectably biased on the same draws: the test has power."""
    program = TinyDiscrete()
    bound = program.exact_bound(X)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(bound, program.params)])
    loss = VIMCO(K)
    values = []

    def vimco(x):
        value, surrogate = loss(program.model, program.guide, x)
        values.append(value.item() / (len(x) // len(X)))
        return -surrogate

    pyro.set_rng_seed(0)
    g = _gradients(program, vimco, 60, 100)
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(len(g)))
    assert z.abs().max() < 4, z  # 19 coordinates: all within 4 SE fails by chance ~1e-3
    v = torch.tensor(values)
    assert abs(v.mean().item() - bound.item()) < 4 * v.std().item() / math.sqrt(len(v))

    def pathwise(x):  # the bound with the draws held fixed: no score term for the guide
        parts = loss._traces(program.model, program.guide, (x,))
        log_w, _ = loss._log_weights(parts)
        return (torch.logsumexp(log_w, 0) - math.log(K)).sum()

    guide = slice(L + D * L + D, None)  # A and c
    p = _gradients(program, pathwise, 30, 100)[:, guide]
    z_bias = (p.mean(0) - exact[guide]) / (p.std(0) / math.sqrt(len(p)))
    assert z_bias.abs().max() > 6, z_bias


def test_vimco_has_lower_gradient_variance_than_the_score_function_elbo():
    """On the sigmoid belief net of the estimator tests (20 binary latents, 64 pixels), at its
    initialization: VIMCO with 5 particles against the single-sample score-function ELBO with the
    average baseline, the guide's (encoder's) gradient variance summed over coordinates, 30
    estimates each on 32 images. Measured with 100: 0.28 against 33 (4155 without a
    baseline); with 30 the variance estimates are good to ~25%, so a factor 10 is far outside
    noise."""
    from test_estimators import SigmoidBeliefNet

    from pvae import data

    x = data.load("digits", binarize="static").x_train[:32]
    torch.manual_seed(0)
    sbn = SigmoidBeliefNet()
    vimco = gradient_variance(sbn, x, loss=VIMCO(5), num_estimates=30)
    score = gradient_variance(sbn, x, loss=ScoreFunctionELBO(baseline="average"),
                              num_estimates=30)
    assert vimco["encoder"]["variance"] < score["encoder"]["variance"] / 10, (vimco, score)


def test_vimco_trains_discrete_latents_with_fit():
    """Added as one class, VIMCO trains through fit like any loss (the history's train_elbo is
    the K-sample bound; the validation value is the one-particle ELBO) and improves."""
    from test_estimators import SigmoidBeliefNet

    from pvae import data

    ds = data.load("digits", binarize="static")
    torch.manual_seed(0)
    history = fit(SigmoidBeliefNet(), ds.x_train[:384], val=ds.x_test[:200], loss=VIMCO(5),
                  num_epochs=3, batch_size=64, seed=0, progress=False)
    val = history.column("val_elbo")
    assert val[-1] > val[0] + 1.0, val


def test_vimco_needs_two_particles():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        VIMCO(1)
