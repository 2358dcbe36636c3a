"""Value tests of the diagnostics against closed forms: the KL per latent dimension, the
posterior-mean variance and active units (Burda, Grosse & Salakhutdinov 2016, §5.2), the PPCA
posterior comparison (KL both ways, log-determinant ratio, principal angles) and the effective
sample size of importance weights (Kong 1992; for Gaussians E_q[w^a] is closed form)."""

import math
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.linalg import subspace_angles

from pvae.inference import elbo_terms, iw_log_likelihood
from pvae.models import PPCA, compare_posteriors
from pvae.stats import ess, principal_angles

from conftest import rng


def randn(*shape, seed):
    g = rng(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, device=g.device)


# -- closed forms for Gaussians (numpy, float64) --------------------------------------------------


def gauss_kl(m0, S0, m1, S1):
    """KL(N(m0, S0) || N(m1, S1))."""
    k = len(m0)
    P1 = np.linalg.inv(S1)
    d = m1 - m0
    return 0.5 * (np.trace(P1 @ S0) + d @ P1 @ d - k
                  + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1])


def weight_moment(a, mp, Sp, mq, Sq):
    """E_q[(p/q)^a] = int p^a q^(1-a) for Gaussians p = N(mp, Sp), q = N(mq, Sq): with P, Q the
    precisions, C = a P - (a - 1) Q (must be positive definite) and h = a P mp - (a - 1) Q mq,
    |Sp|^(-a/2) |Sq|^((a-1)/2) |C|^(-1/2) exp(h^T C^-1 h / 2 - a mp^T P mp / 2
    + (a - 1) mq^T Q mq / 2)."""
    P, Q = np.linalg.inv(Sp), np.linalg.inv(Sq)
    C = a * P - (a - 1) * Q
    assert np.linalg.eigvalsh(C).min() > 0, "E_q[w^a] is infinite"
    h = a * P @ mp - (a - 1) * Q @ mq
    log = (-0.5 * a * np.linalg.slogdet(Sp)[1] + 0.5 * (a - 1) * np.linalg.slogdet(Sq)[1]
           - 0.5 * np.linalg.slogdet(C)[1] + 0.5 * h @ np.linalg.solve(C, h)
           - 0.5 * a * mp @ P @ mp + 0.5 * (a - 1) * mq @ Q @ mq)
    return math.exp(log)


def ess_fraction_and_sd(K, mp, Sp, mq, Sq):
    """E[ESS / K] -> 1 / E_q[w^2] (normalized weights, E_q[w] = 1), and the delta-method sd of
    ESS / K = mean(w)^2 / mean(w^2) for K draws, from E_q[w^a], a = 2, 3, 4."""
    m2, m3, m4 = (weight_moment(a, mp, Sp, mq, Sq) for a in (2, 3, 4))
    gu, gv = 2 / m2, -1 / m2**2  # gradient of u^2 / v at (1, m2)
    var = gu**2 * (m2 - 1) + gv**2 * (m4 - m2**2) + 2 * gu * gv * (m3 - m2)
    return 1 / m2, math.sqrt(var / K)


def test_weight_moment_closed_form_against_quadrature():
    """The helper itself, on a 1-D case by numerical quadrature."""
    z = np.linspace(-30, 30, 200001)
    p = np.exp(-0.5 * (z - 0.5) ** 2) / math.sqrt(2 * math.pi)
    q = np.exp(-0.5 * (z / 1.5) ** 2) / (1.5 * math.sqrt(2 * math.pi))
    for a in (1, 2, 3, 4):
        numeric = np.trapezoid(p**a * q ** (1 - a), z)
        closed = weight_moment(a, np.array([0.5]), np.eye(1), np.zeros(1), 2.25 * np.eye(1))
        assert closed == pytest.approx(numeric, rel=1e-8)


# -- KL per dimension, posterior-mean variance, active units ----------------------------------


SCALES = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
SHIFT = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def guide(x):
    """q(z | x) = N(0.5 x + SHIFT, diag(SCALES^2)): a known diagonal Gaussian per datapoint."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x + SHIFT.to(x.device),
                                     SCALES.to(x.device).expand_as(x)).to_event(1))


def test_kl_per_dim_is_the_mean_over_datapoints_of_the_analytic_kl():
    """KL(N(m, s^2) || N(0, 1)) = (s^2 + m^2 - 1 - log s^2) / 2 per dimension, averaged over
    datapoints (not summed); the per-datapoint KL is its sum over dimensions."""
    x = randn(64, 3, seed=0)
    terms = elbo_terms(SimpleNamespace(model=model, guide=guide), x, num_samples=3)
    m, s2 = 0.5 * x + SHIFT.to(x.device), SCALES.to(x.device) ** 2
    kl = 0.5 * (s2 + m**2 - 1 - s2.log())   # (N, 3)
    assert terms.analytic_kl
    assert torch.allclose(terms.kl_per_dim.double().cpu(), kl.mean(0).cpu(), rtol=1e-10)
    assert torch.allclose(terms.kl.double(), kl.sum(1), rtol=1e-10)
    assert terms.summary()["kl_per_dim"] == pytest.approx(kl.mean(0).tolist(), abs=1e-6)
    # E_q[z] = 0.5 x + SHIFT: its variance over datapoints is 0.25 Var(x)
    assert torch.allclose(terms.posterior_mean_variance.double(), 0.25 * x.var(0), rtol=1e-10)


DF = 6.0


def student_guide(x):
    """q(z | x) = StudentT(6, 0.5 x + SHIFT, SCALES) per dimension: no closed-form KL to N(0, 1)
    in torch, so elbo_terms takes the Monte Carlo path, log q - log p at the drawn z."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.StudentT(DF, 0.5 * x + SHIFT.to(x.device),
                                       SCALES.to(x.device).expand_as(x)).to_event(1))


def test_kl_per_dim_monte_carlo_path_against_the_closed_form():
    """KL(StudentT(nu, m, s) || N(0, 1)) = -H[q] + log(2 pi) / 2 + (m^2 + s^2 nu / (nu - 2)) / 2
    per dimension (H the Student-t entropy), averaged over datapoints; the estimate from
    N x K = 64 x 500 draws is within 5 of its sds, the sd of log q - log p measured here from
    draws of our own."""
    x = randn(64, 3, seed=0)
    K = 500
    terms = elbo_terms(SimpleNamespace(model=model, guide=student_guide), x, num_samples=K)
    assert terms.analytic_kl is False and terms.summary()["analytic_kl"] is False  # a bool
    q = torch.distributions.StudentT(DF, 0.5 * x + SHIFT.to(x.device),
                                     SCALES.to(x.device).expand_as(x))
    kl = -q.entropy() + 0.5 * math.log(2 * math.pi) + 0.5 * (q.loc**2 + q.scale**2 * DF / (DF - 2))
    z = q.sample((K,))
    log_ratio = q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)   # (K, N, 3)
    sd = log_ratio.std(0).pow(2).mean(0).sqrt() / math.sqrt(K * len(x))
    assert ((terms.kl_per_dim.double() - kl.mean(0)).abs() < 5 * sd).all()
    assert (sd < 0.05 * kl.mean(0)).all()  # a tight check: the KL well above its noise
    assert torch.allclose(terms.kl_per_dim.sum().double(), terms.kl.mean().double(), rtol=1e-10)


def two_sites_model(x):
    """z (3 dims) ~ N(0, 1) and w (2 dims) ~ N(0, 4), x | z, w ~ N(z + sum(w), 1); the row sums
    of x observed once more, as s ~ N(sum(z), 1)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0], 2), 2.0).to_event(1))
        pyro.sample("x", dist.Normal(z + w.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)
        pyro.sample("s", dist.Normal(z.sum(-1), 1.0), obs=x.sum(-1))


W_LOC, W_SCALE = torch.tensor([0.7, -0.2], dtype=torch.float64), 0.5


def two_sites_guide(x):
    """q(z | x) as :func:`guide`, q(w | x) = N(W_LOC + 0.1 sum(x), 0.5^2 I); the guide scores
    the row sums too (an observed guide site, given data: no part of q(z | x))."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x + SHIFT.to(x.device),
                                     SCALES.to(x.device).expand_as(x)).to_event(1))
        loc = W_LOC.to(x.device) + 0.1 * x.sum(-1, keepdim=True)
        pyro.sample("w", dist.Normal(loc, W_SCALE).to_event(1))
        pyro.sample("s", dist.Normal(0.0, 3.0), obs=x.sum(-1))


def test_kl_per_dim_concatenates_the_latent_sites_and_leaves_observed_guide_sites_out():
    """Two latent sites: the KL per dimension is z's 3 closed forms then w's 2, the KL their sum
    and the posterior means (z's, then w's) 5 columns; the guide's observed site "s" adds no
    KL, no dimension and no mean."""
    x = randn(64, 3, seed=1)
    terms = elbo_terms(SimpleNamespace(model=two_sites_model, guide=two_sites_guide), x,
                       num_samples=2)
    m, s2 = 0.5 * x + SHIFT.to(x.device), SCALES.to(x.device) ** 2
    kl_z = 0.5 * (s2 + m**2 - 1 - s2.log())  # (N, 3)
    m_w = W_LOC.to(x.device) + 0.1 * x.sum(-1, keepdim=True)  # (N, 2)
    kl_w = torch.log(2.0 / torch.tensor(W_SCALE)) + (W_SCALE**2 + m_w**2) / 8 - 0.5
    kl = torch.cat([kl_z, kl_w], -1)  # (N, 5)
    assert terms.analytic_kl
    assert torch.allclose(terms.kl_per_dim.double().cpu(), kl.mean(0).cpu(), rtol=1e-10)
    assert torch.allclose(terms.kl.double(), kl.sum(1), rtol=1e-10)
    means = torch.cat([m, m_w], -1)
    assert torch.allclose(terms.posterior_mean_variance.double(), means.var(0), rtol=1e-10)


def bottom_up_model(x):
    """z2 ~ N(0, 1), z1 | z2 ~ N(z2, 1), x | z1 ~ N(z1, 1) (3 dims each)."""
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        z1 = pyro.sample("z1", dist.Normal(z2, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z1, 1.0).to_event(1), obs=x)


def bottom_up_guide(x):
    """q(z1 | x) q(z2 | z1): the child drawn before its parent, against the model's order."""
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.5 * x, 0.8).to_event(1))
        pyro.sample("z2", dist.Normal(0.5 * z1, 0.9).to_event(1))


def test_kl_per_dim_of_a_bottom_up_guide_is_its_monte_carlo_kl_split_by_dimension():
    """A guide that draws z1 before its parent z2: p(z1 | z2) is scored at q's draw of z2, which
    depends on z1, so no closed form holds (KL(q(z1 | x) || p(z1 | z2)) at that draw is not
    E_q[log q(z1 | x) - log p(z1 | z2)]); per dimension it is log q - log p at the draws, and
    the dimensions sum to the Monte Carlo KL to rounding."""
    x = randn(32, 3, seed=2)
    terms = elbo_terms(SimpleNamespace(model=bottom_up_model, guide=bottom_up_guide), x,
                       num_samples=50)
    assert terms.analytic_kl is False and terms.kl_per_dim.shape == (6,)
    assert torch.allclose(terms.kl_per_dim.sum().double(), terms.kl.mean().double(), rtol=1e-10)


def test_active_units_threshold_the_variance_not_the_sd():
    """Burda et al. (2016): unit u is active if Cov_x(E_q[z_u]) > 0.01. A diagonal PPCA guide
    with E_q[z] = A x, rows of A sqrt(v_u) e_u, on data whitened to sample covariance I (n - 1
    in the denominator, the package's convention): Cov_x(E_q[z_u]) = v_u exactly. With
    v = (0.005, 0.02, 0.5, 0): two active units (the sd of the first, 0.07, is above 0.01)."""
    v = torch.tensor([0.005, 0.02, 0.5, 0.0], dtype=torch.float64)
    raw = randn(200, 6, seed=1)
    raw = raw - raw.mean(0)
    x = raw @ torch.linalg.inv(torch.linalg.cholesky(raw.T @ raw / 199)).T  # sample cov = I
    ppca = PPCA(6, 4, guide="diagonal").double()
    with torch.no_grad():
        ppca.A.copy_(torch.cat([torch.diag(v.sqrt()), torch.zeros(4, 2, dtype=torch.float64)], 1))
        ppca.b.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0]))  # a shift does not change the variance
    terms = elbo_terms(ppca, x, num_samples=1)
    assert torch.allclose(terms.posterior_mean_variance.double(), v, rtol=1e-8, atol=1e-12)
    assert terms.active_units == 2
    assert terms.summary()["active_units"] == 2 and terms.summary()["latent_dim"] == 4
    assert elbo_terms(ppca, x, num_samples=1, active_threshold=0.1).active_units == 1
    assert elbo_terms(ppca, x, num_samples=1, active_threshold=0.004).active_units == 3


# -- PPCA posterior comparison -----------------------------------------------------------------


def _ppca(W, guide="full"):
    model = PPCA(4, 2, guide=guide).double()
    with torch.no_grad():
        model.W.copy_(torch.as_tensor(W, dtype=torch.float64))
        model.mu.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        model.log_sigma.fill_(0.5 * math.log(0.3))
    return model


W0 = [[1.5, 0.0], [0.4, 1.0], [0.0, 0.8], [0.2, -0.3]]


def exact_posterior_np(W, mu, sigma2, x):
    """p(z | x) = N(M^-1 W^T (x - mu), sigma2 M^-1), M = W^T W + sigma2 I (PRML eq. 12.42)."""
    M = W.T @ W + sigma2 * np.eye(W.shape[1])
    return np.linalg.solve(M, W.T @ (x - mu).T).T, sigma2 * np.linalg.inv(M)


def test_posterior_comparison_kl_both_ways_and_logdet_ratio():
    """A full guide with a mean off by a known map and a covariance wider than the exact one
    (not proportional to it): KL(q||p), KL(p||q), mean error and log|Sq| - log|Sp| per
    datapoint against Gaussian closed forms computed here from W, mu, sigma^2."""
    model = _ppca(W0)
    with torch.no_grad():
        model.A.copy_(torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.0, 0.3, 0.4, 0.1]]))
        model.b.copy_(torch.tensor([-0.2, 0.1]))
        model.scale_tril_raw.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.2]]))
    x = randn(10, 4, seed=2) + torch.tensor([1.0, -2.0, 0.5, 3.0])
    cmp = compare_posteriors(model, x)
    xn = x.cpu().numpy()
    W, mu = np.array(W0), np.array([1.0, -2.0, 0.5, 3.0])
    mp, Sp = exact_posterior_np(W, mu, 0.3, xn)
    L = model.guide_scale_tril().detach().cpu().numpy()
    Sq = L @ L.T
    mq = xn @ model.A.detach().cpu().numpy().T + model.b.detach().cpu().numpy()
    kl_qp = np.array([gauss_kl(mq[i], Sq, mp[i], Sp) for i in range(len(xn))])
    kl_pq = np.array([gauss_kl(mp[i], Sp, mq[i], Sq) for i in range(len(xn))])
    np.testing.assert_allclose(cmp.kl_q_p.cpu().numpy(), kl_qp, rtol=1e-8)
    np.testing.assert_allclose(cmp.kl_p_q.cpu().numpy(), kl_pq, rtol=1e-8)
    assert (np.abs(kl_qp - kl_pq) > 0.5).all()  # the two directions differ clearly here
    np.testing.assert_allclose(cmp.mean_error.cpu().numpy(), np.linalg.norm(mq - mp, axis=1),
                               rtol=1e-8)
    logdet = np.linalg.slogdet(Sq)[1] - np.linalg.slogdet(Sp)[1]
    assert logdet > 1.0
    np.testing.assert_allclose(cmp.logdet_ratio.cpu().numpy(), np.full(len(xn), logdet),
                               rtol=1e-8)
    summary = cmp.summary()
    assert summary["kl_p_q"] == pytest.approx(kl_pq.mean(), rel=1e-8)
    assert summary["kl_q_p"] == pytest.approx(kl_qp.mean(), rel=1e-8)


def test_posterior_comparison_of_a_diagonal_guide_at_its_optimum_is_the_floor():
    """The mean-field optimum (exact mean, precisions diag(M) / sigma^2): KL(q||p) is the floor
    0.5 (sum log M_ii - log|M|), and KL(p||q), another value, is the Gaussian KL computed here."""
    model = _ppca([[1.5, 1.2], [0.4, 1.0], [0.0, 0.8], [0.2, -0.3]], guide="diagonal")
    model.set_guide_to_optimum()
    x = randn(5, 4, seed=3)
    cmp = compare_posteriors(model, x)
    W = model.W.detach().cpu().numpy()
    M = W.T @ W + 0.3 * np.eye(2)
    floor = 0.5 * (np.log(np.diag(M)).sum() - np.linalg.slogdet(M)[1])
    Sp, Sq = 0.3 * np.linalg.inv(M), np.diag(0.3 / np.diag(M))
    reverse = gauss_kl(np.zeros(2), Sp, np.zeros(2), Sq)  # equal means
    assert floor > 0.1 and abs(reverse - floor) > 0.05
    np.testing.assert_allclose(cmp.kl_q_p.cpu().numpy(), floor, rtol=1e-7)
    np.testing.assert_allclose(cmp.kl_p_q.cpu().numpy(), reverse, rtol=1e-7)
    assert cmp.mean_field_floor == pytest.approx(floor, rel=1e-7)
    np.testing.assert_allclose(cmp.logdet_ratio.cpu().numpy(),
                               np.linalg.slogdet(Sq)[1] - np.linalg.slogdet(Sp)[1], rtol=1e-7)


@pytest.mark.parametrize("theta", [7.0, 30.0, 80.0])
def test_posterior_comparison_principal_angles_to_a_reference(theta):
    """Reference loadings whose span is turned by theta degrees in one direction: the angles
    reported are (0, theta) in degrees."""
    t = math.radians(theta)
    model = _ppca([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    ref = _ppca([[1.0, 0.0], [0.0, 3 * math.cos(t)], [0.0, 3 * math.sin(t)], [0.0, 0.0]])
    summary = compare_posteriors(model, randn(4, 4, seed=4), reference=ref).summary()
    assert summary["principal_angles_deg"] == pytest.approx([0.0, theta], abs=1e-4)
    assert summary["max_principal_angle_deg"] == pytest.approx(theta, abs=1e-6)


# -- principal angles ----------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 1.0, 45.0, 60.0, 90.0])
def test_principal_angle_between_two_lines(theta):
    """span(e1) and span(cos t e1 + sin t e2) meet at t, in degrees; scaling does not count."""
    t = math.radians(theta)
    a = torch.tensor([[3.0], [0.0], [0.0]])
    b = torch.tensor([[-2 * math.cos(t)], [-2 * math.sin(t)], [0.0]])
    assert principal_angles(a, b).item() == pytest.approx(theta, abs=1e-5)


def test_principal_angles_of_planes_ascending_and_as_scipy():
    t = math.radians(25.0)
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    B = torch.tensor([[1.0, 1.0], [0.0, math.cos(t)], [0.0, math.sin(t)], [0.0, 0.0]])
    assert principal_angles(A, B).tolist() == pytest.approx([0.0, 25.0], abs=1e-5)
    A, B = randn(7, 3, seed=5), randn(7, 3, seed=6)
    ref = np.degrees(subspace_angles(A.cpu().numpy(), B.cpu().numpy()))[::-1]
    np.testing.assert_allclose(principal_angles(A, B).cpu().numpy(), ref, rtol=1e-8)


# -- effective sample size -----------------------------------------------------------------------


@pytest.mark.parametrize("w,expected", [([1.0, 1.0, 1.0, 1.0], 4.0), ([1.0, 0.0, 0.0], 1.0),
                                        ([1.0, 2.0, 3.0], 36 / 14), ([5.0, 5.0, 0.0, 0.0], 2.0)])
def test_ess_of_known_weights(w, expected):
    w = torch.tensor(w, dtype=torch.float64)
    assert ess(w.log()).item() == pytest.approx(expected, rel=1e-12)
    assert ess(w.log() + 700.0).item() == pytest.approx(expected, rel=1e-12)  # scale-free, stable
    # along a chosen dim
    both = torch.stack([w.log(), torch.zeros_like(w)], 1)
    assert ess(both, dim=0).tolist() == pytest.approx([expected, len(w)], rel=1e-12)


def test_ess_of_a_gaussian_proposal_for_a_gaussian_target():
    """Weights N(z; 0.5, 1) / N(z; 0, 1.5^2) for z from the proposal: ESS / K tends to
    1 / E_q[w^2] (closed form, 0.774), within 4.5 delta-method sds (from E_q[w^3], E_q[w^4])."""
    K = 20000
    z = 1.5 * randn(K, seed=7)
    log_w = (torch.distributions.Normal(0.5, 1.0).log_prob(z)
             - torch.distributions.Normal(0.0, 1.5).log_prob(z))
    expected, sd = ess_fraction_and_sd(K, np.array([0.5]), np.eye(1), np.zeros(1),
                                       2.25 * np.eye(1))
    assert 0.7 < expected < 0.85
    assert abs(ess(log_w).item() / K - expected) < 4.5 * sd


def test_iw_ess_of_a_non_exact_guide_per_datapoint():
    """IWResult.ess on a PPCA whose guide is off the exact posterior: per datapoint, ESS / K
    against 1 / E_q[w^2] with p the exact posterior (computed here), within 4.5 delta-method
    sds each, and their mean z-score within 4 / sqrt(N)."""
    model = _ppca(W0)
    model.set_guide_to_optimum()
    with torch.no_grad():
        model.A.mul_(0.9)  # a mean off in proportion to x, a covariance too wide: light tails
        model.scale_tril_raw.add_(0.4)
    x = randn(12, 4, seed=8) + torch.tensor([1.0, -2.0, 0.5, 3.0])
    K = 2000
    res = iw_log_likelihood(model, x, num_samples=K, seed=0)
    mp, Sp = exact_posterior_np(np.array(W0), np.array([1.0, -2.0, 0.5, 3.0]), 0.3,
                                x.cpu().numpy())
    L = model.guide_scale_tril().detach().cpu().numpy()
    mq = x.cpu().numpy() @ model.A.detach().cpu().numpy().T + model.b.detach().cpu().numpy()
    zs, fractions = [], []
    for i in range(len(x)):
        expected, sd = ess_fraction_and_sd(K, mp[i], Sp, mq[i], L @ L.T)
        fractions.append(expected)
        zs.append((res.ess[i].item() / K - expected) / sd)
    assert max(fractions) < 0.7 and min(fractions) > 0.3  # a non-exact guide
    assert max(abs(z) for z in zs) < 4.5
    assert abs(np.mean(zs)) < 4 / math.sqrt(len(zs))
