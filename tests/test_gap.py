"""The inference gap (Cremer, Li & Duvenaud 2018) on probabilistic PCA, where every part of it
is known in closed form: the amortization gap of a guide is KL(q_phi || p_exact) when the family
contains the exact posterior, and the approximation gap of the mean-field family is its floor."""

import math

import pytest
import torch

from pvae import data
from pvae.inference import inference_gap
from pvae.models import PPCA, compare_posteriors

X = data.load("synthetic-ppca").x_train
X_TEST = data.load("synthetic-ppca").x_test[:10]
KWARGS = dict(num_steps=300, num_elbo_samples=2000, num_samples=1000)
N_ELBO, K_IW = KWARGS["num_elbo_samples"], KWARGS["num_samples"]
# What 300 noisy refinement steps may leave of KL(q* || p(z | x)) where the family holds the exact
# posterior (measured: 0.0015 nats); the approximation gaps below are checked against it.
KL_LEFT = 0.01


def log_weight_sd(model, x):
    """Closed form, per datapoint, of the sd of log w = log p(x, z) - log q(z | x) for z from
    the model's own guide q = N(m, L L^T) against the exact posterior p(z | x) = N(m_p, P^-1):
    log w = log p(x) - log q(z) + log p(z | x) and, with z = m + L e, e ~ N(0, I),
    Var = tr(B^2) / 2 + |L^T P (m - m_p)|^2, B = L^T P L - I (a quadratic plus a linear form
    of a standard Gaussian). The ELBO of n draws has sd log_weight_sd / sqrt(n)."""
    with torch.no_grad():
        q, p = model.guide_distribution(x), model.exact_posterior(x)
        L = q.scale_tril.double() if hasattr(q, "scale_tril") else \
            torch.diag_embed(q.base_dist.scale.double())
        P = torch.linalg.inv(p.covariance_matrix.double())
        B = L.mT @ P @ L - torch.eye(L.shape[-1], dtype=torch.float64)
        d = (q.mean - p.mean).double()
        lin = (L.mT @ (P @ d.unsqueeze(-1))).squeeze(-1)
        return (0.5 * (B @ B).diagonal(dim1=-2, dim2=-1).sum(-1) + lin.pow(2).sum(-1)).sqrt() \
            .expand(len(x))


def near_exact_sd(n):
    """The sd of an average of n log weights (ELBO), or of the IW estimate with K = n, for a q*
    within KL_LEFT of the exact posterior: for q near p, Var_q(log q/p) ~ 2 KL(q || p), and the
    IW estimate's variance is (E_q[w^2] - 1) / K ~ Var_q(log w) / K."""
    return math.sqrt(2 * KL_LEFT / n)


def assert_mcse_is_the_closed_form(mcse, sd):
    """A reported per-datapoint MCSE of an ELBO (sample sd / sqrt(n)) against the closed form:
    the sample sd of n = 2000 log weights is within a few percent of the true sd."""
    ratio = mcse.double() / sd
    assert ((ratio - 1).abs() < 0.15).all(), ratio


def test_full_covariance_guide_amortization_gap_is_its_kl():
    """A perturbed full-covariance guide: q* is the exact posterior, so the approximation gap is
    0 and the amortization gap is KL(q_phi || p(z | x)), per datapoint."""
    model = PPCA.closed_form(X, 3, guide="full")
    with torch.no_grad():
        model.b.add_(0.1)
        model.scale_tril_raw.add_(0.1)
    gap = inference_gap(model, X_TEST, **KWARGS)
    kl = compare_posteriors(model, X_TEST).kl_q_p.double()
    # tolerances: 4 sds of each estimate in closed form (not the MCSEs under test), plus the
    # KL_LEFT nats that the refinement may leave
    sd_amortized = log_weight_sd(model, X_TEST) / math.sqrt(N_ELBO)
    sd = torch.sqrt(sd_amortized**2 + near_exact_sd(N_ELBO) ** 2)
    assert ((gap.amortization_gap - kl).abs() < 4 * sd + KL_LEFT).all()
    sd = math.sqrt(near_exact_sd(K_IW) ** 2 + near_exact_sd(N_ELBO) ** 2)
    assert (gap.approximation_gap.abs() < 4 * sd + KL_LEFT).all()
    exact = model.log_marginal(X_TEST).double()
    assert ((gap.log_likelihood - exact).abs() < 4 * near_exact_sd(K_IW) + 1e-3).all()
    assert_mcse_is_the_closed_form(gap.elbo_amortized_mcse, sd_amortized)
    assert gap.summary()["amortization_gap"] > 1.0  # the perturbation is visible


def test_mean_field_guide_approximation_gap_is_the_floor():
    """Loadings sheared so that the exact posterior is correlated: the diagonal guide set to the
    mean-field optimum has no amortization gap, and its approximation gap is the closed-form
    mean-field floor 0.5 (sum log M_ii - log|M|)."""
    model = PPCA.closed_form(X, 3, guide="diagonal")
    shear = torch.tensor([[1.0, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad():
        model.W.copy_(model.W @ shear)
    model.set_guide_to_optimum()
    floor = model.mean_field_kl_floor().item()
    assert floor > 0.3
    gap = inference_gap(model, X_TEST, **KWARGS)
    # with the exact log p(x): per datapoint, within 4 sds of the ELBO in closed form (q* is the
    # mean-field optimum the guide starts at: the same sd), plus what the refinement may leave
    exact = model.log_marginal(X_TEST).double()
    sd = log_weight_sd(model, X_TEST) / math.sqrt(N_ELBO)
    assert ((exact - gap.elbo_refined - floor).abs() < 4 * sd + KL_LEFT).all()
    assert (gap.amortization_gap.abs() < 4 * math.sqrt(2) * sd + KL_LEFT).all()
    assert_mcse_is_the_closed_form(gap.elbo_amortized_mcse, sd)
    assert_mcse_is_the_closed_form(gap.elbo_refined_mcse, sd)
    # with the IW estimate (q*, K = 1000, a proposal narrower than p(z | x), whose weights have
    # no variance here: 2P - diag(P) is not positive definite): it is noisier and biased low
    # per datapoint, so only the mean over datapoints is checked, within 4 SE of the spread over
    # the datapoints (iid: the floor is the same for every x), measured here, plus 0.02 nats
    approx = gap.approximation_gap.double()
    se = approx.std() / math.sqrt(len(approx))
    assert abs(approx.mean().item() - floor) < 4 * se.item() + 0.02


def test_full_covariance_refinement_of_a_mean_field_guide():
    """family='full': q* may be correlated, so it reaches the exact posterior; the whole
    mean-field floor becomes amortization (here: family) gap and the approximation gap is 0."""
    model = PPCA.closed_form(X, 3, guide="diagonal")
    with torch.no_grad():
        model.W.copy_(model.W @ torch.tensor([[1.0, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    model.set_guide_to_optimum()
    floor = model.mean_field_kl_floor().item()
    gap = inference_gap(model, X_TEST, family="full", **KWARGS)
    exact = model.log_marginal(X_TEST).double()
    sd_refined = near_exact_sd(N_ELBO)
    assert ((exact - gap.elbo_refined).abs() < 4 * sd_refined + KL_LEFT).all()
    sd_amortized = log_weight_sd(model, X_TEST) / math.sqrt(N_ELBO)
    sd = torch.sqrt(sd_amortized**2 + sd_refined**2)
    assert ((gap.amortization_gap - floor).abs() < 4 * sd + KL_LEFT).all()
    assert_mcse_is_the_closed_form(gap.elbo_amortized_mcse, sd_amortized)


def test_bad_guide_family_and_arguments():
    from pvae.models import VAE

    with pytest.raises(ValueError, match="num_steps"):
        inference_gap(VAE(4, 2), torch.zeros(2, 4), num_steps=-1)
    with pytest.raises(ValueError, match="finite"):
        inference_gap(VAE(4, 2), torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="family"):
        inference_gap(VAE(4, 2), torch.zeros(2, 4), family="flow")
