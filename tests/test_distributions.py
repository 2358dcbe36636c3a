"""The cheaper training-time distributions have torch's densities and gradients."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributions as td

from pvae.distributions import ReparamNormal
from pvae.inference import ScoreFunctionELBO

from conftest import rng


def _params(dtype=torch.float32):
    g = rng(0)
    loc = torch.randn(5, 3, generator=g, dtype=dtype).requires_grad_()
    scale = (torch.rand(5, 3, generator=g, dtype=dtype) + 0.1).requires_grad_()
    return loc, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reparam_normal_log_prob_of_its_sample_equals_torch(dtype):
    """log q(z) of its own reparameterized sample: value and total gradient w.r.t. loc and
    scale equal torch's Normal evaluated at the same z (the gradient through z included)."""
    loc, scale = _params(dtype)
    pyro.set_rng_seed(1)
    q = ReparamNormal(loc, scale).to_event(1)
    z = q.rsample()
    lp = q.log_prob(z)
    ref = td.Normal(loc, scale).log_prob(z).sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert lp.shape == (5,) and torch.allclose(lp, ref, atol=tol)
    grads = torch.autograd.grad(lp.sum(), (loc, scale), allow_unused=True, materialize_grads=True)
    refs = torch.autograd.grad(ref.sum(), (loc, scale))
    for g, r in zip(grads, refs):
        assert torch.allclose(g, r, atol=10 * tol)
    # the path through z cancels: d log q(z(loc, scale)) / d loc = 0, d / d scale = -1 / scale
    assert torch.allclose(grads[0], torch.zeros_like(loc), atol=10 * tol)
    assert torch.allclose(grads[1], -1 / scale, atol=10 * tol)


def test_reparam_normal_other_values_and_expand():
    """Any other value (a copy of the sample, a detached sample, new points) and an expanded
    copy take torch's formula: the partial gradient with z fixed is not zero."""
    loc, scale = _params()
    q = ReparamNormal(loc, scale)
    z = q.rsample()
    for value in (z.detach(), z.clone(), torch.randn(5, 3)):
        assert torch.allclose(q.log_prob(value), td.Normal(loc, scale).log_prob(value))
    g = torch.autograd.grad(q.log_prob(z.detach()).sum(), loc)[0]
    assert g.abs().max() > 1e-3
    wide = q.expand([2, 5, 3])
    assert type(wide) is ReparamNormal and wide.batch_shape == (2, 5, 3)
    zw = wide.rsample()
    assert torch.allclose(wide.log_prob(zw), td.Normal(loc, scale).log_prob(zw), atol=1e-5)
    assert torch.allclose(wide.log_prob(torch.zeros(5, 3)),
                          td.Normal(loc, scale).log_prob(torch.zeros(5, 3)).expand(2, 5, 3))


def test_reparam_normal_kl_and_sample():
    """Analytic KL dispatches as for Normal; ``sample`` carries no gradient."""
    loc, scale = _params()
    q = ReparamNormal(loc, scale)
    assert torch.allclose(td.kl_divergence(q, dist.Normal(0.0, 1.0)),
                          td.kl_divergence(td.Normal(loc, scale), td.Normal(0.0, 1.0)))
    assert not q.sample().requires_grad


def test_score_function_gradient_does_not_use_the_shortcut():
    """With score-function gradients the guide samples without rsample, so the surrogate's
    gradient is the same as with torch's Normal (the score of log q with z held fixed)."""
    grads = []
    for guide_dist in (dist.Normal, ReparamNormal):
        loc = torch.full((4, 2), 0.5, requires_grad=True)

        def model(x):
            with pyro.plate("data", 4):
                z = pyro.sample("z", dist.Normal(torch.zeros(4, 2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

        def guide(x, guide_dist=guide_dist, loc=loc):
            with pyro.plate("data", 4):
                pyro.sample("z", guide_dist(loc, torch.ones(4, 2)).to_event(1))

        pyro.set_rng_seed(0)
        _, surrogate = ScoreFunctionELBO()(model, guide, torch.ones(4, 2))
        grads.append(torch.autograd.grad(surrogate, loc)[0])
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[0], grads[1])


def test_score_function_gradients_survive_vectorized_particles():
    """The score-function handler keeps a reparameterizable site non-reparameterized when a
    plate outside it (TraceGraph_ELBO's vectorized particles) expands its distribution: Pyro's
    has_rsample_(False) on the base of an Independent raised there (an AttributeError)."""
    from pvae.models import VAE

    torch.manual_seed(0)
    vae = VAE(6, 2, (4,))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    value, surrogate = ScoreFunctionELBO(num_particles=3)(vae.model, vae.guide, x)
    grads = torch.autograd.grad(surrogate, list(vae.encoder.parameters()))
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
