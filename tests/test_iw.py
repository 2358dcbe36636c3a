"""Importance-weighted log-likelihood and ELBO terms against closed forms.

Tolerances are k standard errors of the Monte Carlo estimate over datapoints (k = 3 or 4),
except where the guide is the exact posterior: then every weight equals p(x) and the estimate
is exact up to floating-point error.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.inference import elbo_terms, iw_log_likelihood, log_weights

from conftest import rng

torch.set_default_dtype(torch.float32)


def _mean_se(v):
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


# ---------------------------------------------------------------------------------------------
# PPCA written as a Pyro program in the test


class LinearGaussian:
    """z ~ N(0, I_q), x | z ~ N(W z + mu, sigma^2 I_D); guide N(A x + b, L L^T) (full cov)."""

    def __init__(self, D=5, q=2, sigma=0.5, seed=0, dtype=torch.float64):
        g = rng(seed)
        self.W = torch.randn(D, q, generator=g, dtype=dtype)
        self.mu = torch.randn(D, generator=g, dtype=dtype)
        self.sigma = sigma
        M = self.W.T @ self.W + sigma**2 * torch.eye(q, dtype=dtype)
        Minv = torch.linalg.inv(M)
        # exact posterior: N(M^-1 W^T (x - mu), sigma^2 M^-1)
        self.A = Minv @ self.W.T
        self.b = -self.A @ self.mu
        self.L = torch.linalg.cholesky(sigma**2 * Minv)
        self.q, self.D = q, D

    def exact_log_marginal(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.D, dtype=x.dtype)
        return dist.MultivariateNormal(self.mu.to(x.dtype), cov).log_prob(x)

    def sample(self, n, seed=1):
        g = rng(seed)
        z = torch.randn(n, self.q, generator=g, dtype=self.W.dtype)
        return z @ self.W.T + self.mu + self.sigma * torch.randn(n, self.D, generator=g,
                                                                 dtype=self.W.dtype)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.q), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T.to(x.dtype) + self.mu.to(x.dtype),
                                         self.sigma).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = x @ self.A.T.to(x.dtype) + self.b.to(x.dtype)
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=self.L.to(x.dtype)))

    def wrong(self, shift=0.3, inflate=1.4):
        """The same model with a deliberately wrong guide."""
        other = LinearGaussian.__new__(LinearGaussian)
        other.__dict__.update(self.__dict__)
        other.b = self.b + shift
        other.L = self.L * inflate
        return other


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian()


def test_exact_guide_gives_exact_log_marginal(lg):
    x = lg.sample(50)
    exact = lg.exact_log_marginal(x)
    for K in (1, 7, 100):
        iw = iw_log_likelihood(lg, x, num_samples=K)
        assert torch.allclose(iw.per_datapoint, exact, atol=1e-4, rtol=0)
        assert torch.allclose(iw.ess, torch.full_like(iw.ess, K), rtol=1e-6)


def test_wrong_guide_k1_matches_elbo(lg):
    wrong, x = lg.wrong(), lg.sample(400)
    k1 = iw_log_likelihood(wrong, x, num_samples=1).per_datapoint
    elbo = elbo_terms(wrong, x, num_samples=2000).elbo
    d = k1 - elbo
    mean, se = _mean_se(d)
    assert abs(mean) < 3 * se


def test_wrong_guide_increases_with_k_and_converges(lg):
    wrong, x = lg.wrong(), lg.sample(200)
    exact = lg.exact_log_marginal(x)
    means = []
    for K in (1, 10, 100, 5000):
        iw = iw_log_likelihood(wrong, x, num_samples=K)
        means.append(iw.mean)
        gap_mean, gap_se = _mean_se(iw.per_datapoint - exact)
        assert gap_mean < 3 * gap_se + 1e-6  # a lower bound in expectation
    assert means == sorted(means) and means[-1] > means[0] + 0.05
    d = iw.per_datapoint - exact
    mean, se = _mean_se(d)
    assert abs(mean) < 3 * se + 1e-3


def test_elbo_terms_closed_form(lg):
    """Gaussian guide and prior: analytic KL; the ELBO's terms add up; with the exact guide
    the ELBO equals log p(x) (zero gap)."""
    x = lg.sample(100)
    terms = elbo_terms(lg, x, num_samples=50)
    assert terms.analytic_kl
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl)
    diff = terms.elbo - lg.exact_log_marginal(x)
    mean, se = _mean_se(diff)
    assert abs(mean) < 4 * se + 1e-3
    # KL(q || p) for the exact posterior in closed form
    S = lg.L @ lg.L.T
    loc = x @ lg.A.T + lg.b
    kl = 0.5 * (torch.trace(S) + (loc**2).sum(-1) - lg.q - torch.logdet(S))
    assert torch.allclose(terms.kl, kl, atol=1e-6)


def test_chunking_and_batching_do_not_change_results(lg):
    x = lg.sample(30)
    a = iw_log_likelihood(lg, x, num_samples=64)
    b = iw_log_likelihood(lg, x, num_samples=64, batch_size=7, chunk_size=5)
    assert torch.allclose(a.per_datapoint, b.per_datapoint, atol=1e-8)
    wrong = lg.wrong()
    a = iw_log_likelihood(wrong, x, num_samples=2000)
    b = iw_log_likelihood(wrong, x, num_samples=2000, batch_size=4, chunk_size=37)
    # each per-datapoint estimate has MC std about sqrt((K/ESS - 1)/K); two independent runs
    std = torch.sqrt((2000 / a.ess - 1) / 2000)
    assert ((a.per_datapoint - b.per_datapoint).abs() < 5 * math.sqrt(2) * std + 1e-6).all()


def test_float32_large_log_weights():
    """log-weights of magnitude 1e4 in float32 with K = 5000: finite and accurate."""
    lg = LinearGaussian(D=50, q=2, sigma=0.05, dtype=torch.float64)
    x64 = lg.sample(20) + 1.0  # far from the model's typical set: log p(x) ~ -1e4
    exact = lg.exact_log_marginal(x64)
    assert exact.abs().min() > 5e3
    x32 = x64.float()
    iw = iw_log_likelihood(lg, x32, num_samples=5000, chunk_size=500)
    assert torch.isfinite(iw.per_datapoint).all()
    assert ((iw.per_datapoint.double() - exact).abs() / exact.abs()).max() < 1e-5
    iw_wrong = iw_log_likelihood(lg.wrong(shift=0.01, inflate=1.1), x32, num_samples=5000)
    assert torch.isfinite(iw_wrong.per_datapoint).all()
    assert (iw_wrong.per_datapoint.double() <= exact + 1e-2 * exact.abs()).all()


# ---------------------------------------------------------------------------------------------
# Two latent sites and a nested plate


class Hierarchical:
    """z1 ~ N(0, I_2); z2 | z1 ~ N(B z1, s^2 I_2); x_d | z2 ~ N(W_d z2 + mu_d, sigma^2) for d in
    a nested plate "pixels" (dim -2). Guide: q(z1 | x) q(z2 | z1, x), exact or perturbed."""

    def __init__(self, D=4, s=0.7, sigma=0.4, seed=0, perturb=0.0):
        g = rng(seed)
        dt = torch.float64
        self.B = torch.randn(2, 2, generator=g, dtype=dt)
        self.W = torch.randn(D, 2, generator=g, dtype=dt)
        self.mu = torch.randn(D, generator=g, dtype=dt)
        self.s, self.sigma, self.D = s, sigma, D
        # joint prior of u = (z1, z2) and the linear observation x = H u + mu + noise
        I2 = torch.eye(2, dtype=dt)
        prior_cov = torch.cat([torch.cat([I2, self.B.T], 1),
                               torch.cat([self.B, self.B @ self.B.T + s**2 * I2], 1)])
        H = torch.cat([torch.zeros(D, 2, dtype=dt), self.W], 1)
        self.marginal_cov = H @ prior_cov @ H.T + sigma**2 * torch.eye(D, dtype=dt)
        P = torch.linalg.inv(prior_cov) + H.T @ H / sigma**2
        C = torch.linalg.inv(P)  # posterior covariance of u
        self.post_gain = C @ H.T / sigma**2  # posterior mean = gain (x - mu)
        C11, C12, C22 = C[:2, :2], C[:2, 2:], C[2:, 2:]
        self.L1 = torch.linalg.cholesky(C11) * (1 + perturb)
        self.cond = C12.T @ torch.linalg.inv(C11)
        self.L2 = torch.linalg.cholesky(C22 - self.cond @ C12) * (1 + perturb)
        self.shift = perturb

    def exact_log_marginal(self, x):
        return dist.MultivariateNormal(self.mu, self.marginal_cov).log_prob(x)

    def sample(self, n, seed=1):
        g = rng(seed)
        eps = torch.randn(n, self.D, generator=g, dtype=torch.float64)
        return eps @ torch.linalg.cholesky(self.marginal_cov).T + self.mu

    def model(self, x):
        N = x.shape[0]
        with pyro.plate("data", N, dim=-1):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(N, 2), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ self.B.T, self.s).to_event(1))
            with pyro.plate("pixels", self.D, dim=-2):
                # z2 has batch shape (..., 1, N): the size-1 dim is the pixels plate
                loc = (z2 * self.W[:, None, :]).sum(-1) + self.mu[:, None]  # (..., D, N)
                pyro.sample("x", dist.Normal(loc, self.sigma), obs=x.T)

    def guide(self, x):
        mean = (x - self.mu) @ self.post_gain.T
        m1, m2 = mean[:, :2] + self.shift, mean[:, 2:]
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.MultivariateNormal(m1, scale_tril=self.L1))
            loc2 = m2 + (z1 - m1 + self.shift) @ self.cond.T
            pyro.sample("z2", dist.MultivariateNormal(loc2, scale_tril=self.L2))


def test_two_sites_nested_plate_exact_guide():
    h = Hierarchical()
    x = h.sample(40)
    exact = h.exact_log_marginal(x)
    for K in (1, 50):
        iw = iw_log_likelihood(h, x, num_samples=K, chunk_size=16)
        assert torch.allclose(iw.per_datapoint, exact, atol=1e-4, rtol=0)


def test_two_sites_nested_plate_wrong_guide():
    h = Hierarchical(perturb=0.3)
    x = h.sample(300)
    exact = h.exact_log_marginal(x)
    k1 = iw_log_likelihood(h, x, num_samples=1).per_datapoint
    mean, se = _mean_se(k1 - elbo_terms(h, x, num_samples=1000).elbo)
    assert abs(mean) < 3 * se
    results = [iw_log_likelihood(h, x, num_samples=K) for K in (1, 20, 5000)]
    means = [r.mean for r in results]
    assert means == sorted(means)
    mean, se = _mean_se(results[-1].per_datapoint - exact)
    assert abs(mean) < 3 * se + 1e-3
    terms = elbo_terms(h, x)
    assert terms.kl_per_dim is None  # full-covariance guides do not split into dimensions
    assert terms.posterior_mean_variance.shape == (4,)  # z1 and z2, 2 dims each


# ---------------------------------------------------------------------------------------------
# A discrete latent: exact log p(x) by enumeration


class Mixture:
    """z ~ Categorical(pi), x | z ~ N(m_z, I_2); guide q(z | x) = exact posterior or uniform."""

    def __init__(self, exact_guide=True):
        self.logits = torch.tensor([0.2, -0.5, 0.3], dtype=torch.float64)
        self.means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
        self.exact_guide = exact_guide

    def joint(self, x):  # (N, 3): log pi_k + log N(x; m_k, I)
        comp = dist.Normal(self.means, 1.0).to_event(1).log_prob(x.unsqueeze(-2))
        return self.logits.log_softmax(-1) + comp

    def exact_log_marginal(self, x):
        return self.joint(x).logsumexp(-1)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=self.logits))
            pyro.sample("x", dist.Normal(self.means[z], 1.0).to_event(1), obs=x)

    def guide(self, x):
        logits = self.joint(x) if self.exact_guide else x.new_zeros(x.shape[0], 3)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=logits))


def test_discrete_latent():
    x = torch.randn(200, 2, generator=rng(0), dtype=torch.float64) * 2
    exact = Mixture().exact_log_marginal(x)
    iw = iw_log_likelihood(Mixture(True), x, num_samples=10)
    assert torch.allclose(iw.per_datapoint, exact, atol=1e-6)
    iw = iw_log_likelihood(Mixture(False), x, num_samples=5000)
    mean, se = _mean_se(iw.per_datapoint - exact)
    assert abs(mean) < 3 * se + 1e-3
    terms = elbo_terms(Mixture(False), x, num_samples=200)
    assert terms.analytic_kl  # Categorical vs Categorical has a closed form
    mean, se = _mean_se(terms.elbo - exact)
    assert mean < -0.1 and abs(mean) > 3 * se  # the uniform guide's ELBO is clearly below


# ---------------------------------------------------------------------------------------------
# Errors, scaling


def test_poutine_scale_does_not_enter(lg):
    """beta or subsampling scales (poutine.scale) must not change the IW estimate."""
    x = lg.sample(20)
    scaled = LinearGaussian()
    scaled.model = pyro.poutine.scale(lg.model, scale=0.25)
    scaled.guide = pyro.poutine.scale(lg.guide, scale=0.25)
    a = iw_log_likelihood(lg, x, num_samples=5).per_datapoint
    b = iw_log_likelihood(scaled, x, num_samples=5).per_datapoint
    assert torch.allclose(a, b, atol=1e-8)


def test_bad_input(lg):
    x = lg.sample(5)
    with pytest.raises(ValueError, match="num_samples"):
        iw_log_likelihood(lg, x, num_samples=0)
    with pytest.raises(ValueError, match="NaN"):
        iw_log_likelihood(lg, x * float("nan"), num_samples=2)
    with pytest.raises(ValueError, match="chunk_size"):
        iw_log_likelihood(lg, x, num_samples=2, chunk_size=0)
    from pvae.models import VAE

    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        iw_log_likelihood(VAE(12, 2, (4,)), torch.zeros(3, 5), num_samples=2)


def test_global_latent_is_refused():
    class Global:
        def model(self, x):
            m = pyro.sample("m", dist.Normal(x.new_zeros(()), 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(m, 1.0).expand([x.shape[0], 1]).to_event(1), obs=x)

        def guide(self, x):
            pyro.sample("m", dist.Normal(x.new_zeros(()), 1.0))

    with pytest.raises(ValueError, match="outside pyro.plate"):
        iw_log_likelihood(Global(), torch.zeros(3, 1), num_samples=2)


def test_log_weights_have_gradients(lg):
    x = lg.sample(4)
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    m = lg.wrong()
    inner_guide = m.guide
    m.guide = lambda x: inner_guide(x + w)
    lw = log_weights(m, x, num_samples=3)
    assert lw.shape == (3, 4)
    lw.sum().backward()
    assert w.grad is not None


def test_default_evaluation_sizes_by_device():
    """Cache-sized passes on a CPU (measured best: ~5,000 rows of 784 pixels, see
    benchmarks/bench_iwll.py --sweep), never more particles than K nor datapoints than N."""
    from pvae.inference.sizes import default_sizes, pass_rows

    cpu = torch.device("cpu")
    assert default_sizes(10_000, 5000, cpu, 784) == (250, 20)
    assert default_sizes(3, 5000, cpu, 784) == (3, 5000 // 3)
    assert default_sizes(10_000, 7, cpu, 784) == (250, 7)
    assert default_sizes(10_000, 5000, cpu, 784, batch_size=10, chunk_size=3) == (10, 3)
    assert pass_rows(cpu, 64) == 5000 * 784 // 64  # narrower data: more rows per pass


def test_distributed_false_in_a_process_group_is_the_one_process_evaluation(lg, tmp_path):
    """In a process group (gloo, one rank), ``distributed=False`` computes everything here as
    without a group: the same draws from torch's global RNG as it stands, so the same numbers
    from the same seed. ``True`` and ``"auto"`` shard: rank 0 draws a seed from that RNG and
    sends it to the others, so they agree with each other; a given seed is used as given by
    all three. (A wrong guide: with the exact one every draw gives log p(x).)"""
    import torch.distributed as tdist

    wrong, x = lg.wrong(), lg.sample(20)

    def run(distributed, seed=None):
        torch.manual_seed(0)
        return iw_log_likelihood(wrong, x, num_samples=8, seed=seed,
                                 distributed=distributed).per_datapoint

    alone, alone_seeded = run("auto"), run("auto", seed=3)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                             world_size=1)
    try:
        assert torch.equal(run(False), alone)
        assert torch.equal(run(True), run("auto"))
        assert not torch.equal(run(True), alone)  # the drawn seed's stream, not the caller's
        for distributed in (False, True, "auto"):
            assert torch.equal(run(distributed, seed=3), alone_seeded), distributed
    finally:
        tdist.destroy_process_group()
