"""The inference gap (Cremer, Li & Duvenaud 2018) on probabilistic PCA, where every part of it
is known in closed form: the amortization gap of a guide is KL(q_phi || p_exact) when the family
contains the exact posterior, and the approximation gap of the mean-field family is its floor."""

import pytest
import torch

from pvae import data
from pvae.inference import inference_gap
from pvae.models import PPCA, compare_posteriors

X = data.load("synthetic-ppca").x_train
X_TEST = data.load("synthetic-ppca").x_test[:10]
KWARGS = dict(num_steps=300, num_elbo_samples=2000, num_samples=1000)


def test_full_covariance_guide_amortization_gap_is_its_kl():
    """A perturbed full-covariance guide: q* is the exact posterior, so the approximation gap is
    0 and the amortization gap is KL(q_phi || p(z | x)), per datapoint."""
    model = PPCA.closed_form(X, 3, guide="full")
    with torch.no_grad():
        model.b.add_(0.1)
        model.scale_tril_raw.add_(0.1)
    gap = inference_gap(model, X_TEST, **KWARGS)
    kl = compare_posteriors(model, X_TEST).kl_q_p.double()
    # tolerance: 4 Monte Carlo standard errors of each estimate, plus 0.01 nats left by a
    # refinement of 300 noisy steps (its measured residual was 0.0015)
    mcse = torch.sqrt(gap.elbo_amortized_mcse**2 + gap.elbo_refined_mcse**2)
    assert ((gap.amortization_gap - kl).abs() < 4 * mcse + 0.01).all()
    approx_mcse = torch.sqrt(gap.log_likelihood_mcse**2 + gap.elbo_refined_mcse**2)
    assert (gap.approximation_gap.abs() < 4 * approx_mcse + 0.01).all()
    exact = model.log_marginal(X_TEST).double()
    assert ((gap.log_likelihood - exact).abs() < 4 * gap.log_likelihood_mcse + 1e-3).all()
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
    # with the exact log p(x): per datapoint, within the ELBO's Monte Carlo error
    exact = model.log_marginal(X_TEST).double()
    assert ((exact - gap.elbo_refined - floor).abs() < 4 * gap.elbo_refined_mcse + 0.01).all()
    amort_mcse = torch.sqrt(gap.elbo_amortized_mcse**2 + gap.elbo_refined_mcse**2)
    assert (gap.amortization_gap.abs() < 4 * amort_mcse + 0.01).all()
    # with the IW estimate (q*, K = 1000, a proposal narrower than p(z | x)): it is noisier and
    # biased low per datapoint, so only the mean over datapoints is checked, within 4 SE
    summary = gap.summary()
    assert abs(summary["approximation_gap"] - floor) < 4 * summary["approximation_gap_stderr"] + 0.02


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
    assert ((exact - gap.elbo_refined).abs() < 4 * gap.elbo_refined_mcse + 0.01).all()
    amort_mcse = torch.sqrt(gap.elbo_amortized_mcse**2 + gap.elbo_refined_mcse**2)
    assert ((gap.amortization_gap - floor).abs() < 4 * amort_mcse + 0.01).all()


def test_bad_guide_family_and_arguments():
    from pvae.models import VAE

    with pytest.raises(ValueError, match="num_steps"):
        inference_gap(VAE(4, 2), torch.zeros(2, 4), num_steps=-1)
    with pytest.raises(ValueError, match="finite"):
        inference_gap(VAE(4, 2), torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="family"):
        inference_gap(VAE(4, 2), torch.zeros(2, 4), family="flow")
