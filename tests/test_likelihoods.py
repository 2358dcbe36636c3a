import pytest
import torch
import torch.distributions as td

from pvae.models import make_likelihood


@pytest.mark.parametrize("name,ref", [
    ("bernoulli", lambda out, x: td.Bernoulli(logits=out).log_prob(x)),
    ("continuous-bernoulli", lambda out, x: td.ContinuousBernoulli(logits=out).log_prob(x)),
    ("gaussian", lambda out, x: td.Normal(out, 0.3).log_prob(x)),
    ("laplace", lambda out, x: td.Laplace(out, 0.3).log_prob(x)),
])
def test_log_density_matches_torch(name, ref):
    lik = make_likelihood(name, 5, scale=0.3)
    out = torch.randn(4, 5)
    x = torch.bernoulli(torch.rand(4, 5)) if name == "bernoulli" else torch.rand(4, 5)
    expected = ref(out, x).sum(-1)
    assert torch.allclose(lik(out).log_prob(x), expected, atol=1e-5)


def test_learned_scale_is_a_parameter():
    lik = make_likelihood("gaussian", 3)
    assert [n for n, _ in lik.named_parameters()] == ["log_scale"]
    out, x = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.allclose(lik(out).log_prob(x), td.Normal(0, 1.0).log_prob(x).sum(-1))


def test_bernoulli_rejects_grayscale():
    with pytest.raises(ValueError, match="binarize"):
        make_likelihood("bernoulli", 3).check(torch.tensor([[0.0, 0.5, 1.0]]))


def test_continuous_bernoulli_support():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_likelihood("continuous-bernoulli", 2).check(torch.tensor([[0.1, 1.2]]))


def test_nan_rejected():
    with pytest.raises(ValueError, match="NaN"):
        make_likelihood("gaussian", 2).check(torch.tensor([[0.1, float("nan")]]))


def test_bad_names_and_scales():
    with pytest.raises(ValueError, match="unknown likelihood"):
        make_likelihood("poisson", 2)
    with pytest.raises(ValueError, match="scale > 0"):
        make_likelihood("gaussian", 2, scale=-1.0)


def test_fused_bernoulli_expands_and_broadcasts():
    """The Bernoulli likelihood's fused log_prob survives Pyro's plate broadcasting (expand)
    and broadcasts observations against particle dims, with gradients equal to torch's."""
    out = torch.randn(3, 4, 6, requires_grad=True)
    x = torch.bernoulli(torch.rand(4, 6))
    fused = make_likelihood("bernoulli", 6)(out).expand([2, 3, 4])
    assert type(fused).__name__ == "IndependentBernoulli" and fused.batch_shape == (2, 3, 4)
    lp = fused.log_prob(x)
    ref = td.Bernoulli(logits=out).log_prob(x).sum(-1).expand(2, 3, 4)
    assert torch.allclose(lp, ref, atol=1e-5)
    (g,) = torch.autograd.grad(lp.sum(), out)
    (g_ref,) = torch.autograd.grad(ref.sum(), out)
    assert torch.allclose(g, g_ref, atol=1e-6)
