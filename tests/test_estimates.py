"""Exact values of the estimates and summaries that pvae reports, on models where they are known:
a PPCA or a conjugate Gaussian whose guide is the exact posterior (every importance weight is
then log p(x) exactly), summaries of hand-made results (their keys, means, standard errors and
rounding), the documented defaults and the refusals of the evaluation entry points, and the
refined guide of the inference gap started where the amortized guide is. Written to kill the
surviving mutants of issue 31's mutation run (see ``make mutation``)."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from pvae.inference import (
    ElboTerms,
    InferenceGap,
    RefinedGuide,
    elbo_terms,
    inference_gap,
    log_weights,
)
from pvae.models import PPCA
from pvae.stats import logmeanexp, principal_angles

from conftest import rng

D, Q, SIGMA2 = 4, 2, 0.5
# sheared loadings: W^T W is not diagonal, so the exact posterior is correlated (its Cholesky
# factor has an off-diagonal entry); mu != 0
W = [[1.0, 0.0], [0.5, 1.0], [0.0, 0.7], [0.3, -0.4]]
MU = [1.0, -1.0, 0.5, 2.0]


def ppca(guide: str = "full") -> PPCA:
    """A float64 PPCA with known parameters, its guide at the optimum of its family (for
    ``"full"``: the exact posterior)."""
    model = PPCA(D, Q, guide=guide).double()
    with torch.no_grad():
        model.W.copy_(torch.tensor(W, dtype=torch.float64))
        model.mu.copy_(torch.tensor(MU, dtype=torch.float64))
        model.log_sigma.fill_(0.5 * math.log(SIGMA2))
    model.set_guide_to_optimum()
    return model


def draw(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=rng(seed), dtype=torch.float64) * 1.5 + \
        torch.tensor(MU, dtype=torch.float64)


class Conditional:
    """z ~ N(0, 1), x | z, c ~ N(z + c, S2) per datapoint, with the exact posterior as guide:
    p(z | x, c) = N((x - c) / (1 + S2), S2 / (1 + S2)) and p(x | c) = N(c, 1 + S2)."""

    S2 = 0.25

    def model(self, x, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z + c, math.sqrt(self.S2)), obs=x)

    def guide(self, x, c):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - c) / (1 + self.S2),
                                         math.sqrt(self.S2 / (1 + self.S2))))

    def log_marginal(self, x, c):
        return dist.Normal(c, math.sqrt(1 + self.S2)).log_prob(x)


def conditional_data(n=5):
    g = rng(3)
    return (torch.randn(n, generator=g, dtype=torch.float64),
            3 * torch.randn(n, generator=g, dtype=torch.float64))


# -- stats ------------------------------------------------------------------------------------


def test_logmeanexp_reduces_the_first_dim_by_default():
    t = torch.randn(3, 5, generator=rng(0), dtype=torch.float64)
    assert logmeanexp(t).shape == (5,)
    torch.testing.assert_close(logmeanexp(t), t.exp().mean(0).log())
    torch.testing.assert_close(logmeanexp(t, 1), t.exp().mean(1).log())


def test_principal_angles_of_a_span_with_itself_are_zero_not_nan():
    """The singular values of Q^T Q are 1 up to rounding, often just above it: the angles must
    still be 0 (arccos of a value above 1 is NaN)."""
    g = rng(1)
    for _ in range(10):
        A = torch.randn(5, 2, generator=g, dtype=torch.float64)
        B = A @ torch.tensor([[2.0, 1.0], [0.0, -1.0]], dtype=torch.float64)  # same span
        for other in (A, B):
            angles = principal_angles(A, other)
            assert torch.isfinite(angles).all(), angles
            assert (angles.abs() < 1e-5).all(), angles


# -- log_weights ------------------------------------------------------------------------------


def test_log_weights_of_the_exact_posterior_are_the_exact_log_marginal():
    """With q(z | x) = p(z | x), log p(x, z) - log q(z | x) = log p(x) for every z: one particle
    by default, shape (num_samples, N)."""
    model, x = ppca(), draw(6, 0)
    exact = model.log_marginal(x).detach()
    # tolerance: the guide's Cholesky diagonal carries a floor of 1e-6 (PPCA.guide_scale_tril),
    # a few 1e-6 nats away from the exact posterior
    close = dict(rtol=0, atol=1e-4)
    one = log_weights(model, x)
    assert one.shape == (1, 6)
    torch.testing.assert_close(one[0].detach(), exact, **close)
    many = log_weights(model, x, num_samples=7)
    assert many.shape == (7, 6)
    torch.testing.assert_close(many.detach(), exact.expand(7, -1), **close)
    assert many.detach().std(0).max() < 1e-5  # not a spread that the tolerance could hide


def test_log_weights_of_a_conditional_model_are_log_p_x_given_c():
    x, c = conditional_data()
    lw = log_weights(Conditional(), x, c=c, num_samples=3)
    torch.testing.assert_close(lw, Conditional().log_marginal(x, c).expand(3, -1))


class TwoViews:
    """z ~ N(0, 1); x | z ~ N(z, 1), and a second observed site y ~ N(0, 1) that ignores z: its
    log-density enters every weight as a known constant."""

    def model(self, x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            pyro.sample("y", dist.Normal(torch.zeros_like(y), 1.0), obs=y)

    def guide(self, x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 3, torch.ones_like(x)))


def test_log_weights_of_selected_observed_sites_leave_the_others_out():
    x, y = conditional_data()
    pyro.set_rng_seed(5)
    both = log_weights(TwoViews(), x, c=y, num_samples=4)
    pyro.set_rng_seed(5)
    only_x = log_weights(TwoViews(), x, c=y, num_samples=4, observed=("x",))
    log_py = dist.Normal(0.0, 1.0).log_prob(y)
    assert (log_py.abs() > 0.9).all()  # not a difference that could vanish
    torch.testing.assert_close(both - only_x, log_py.expand(4, -1))


class Grid:
    """x: (rows, cols), z and x inside plates "rows" (dim -2) and "data" (dim -1): the data
    plate is "data" unless ``data_plate`` names "rows"."""

    def model(self, x):
        with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("data", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(x / 2, torch.full_like(x, 0.5)))


def test_log_weights_per_datapoint_of_the_named_data_plate():
    """Per datapoint of the plate found ("data": one per column) or of the one named ("rows"):
    the same draws, summed the other way."""
    x = torch.randn(3, 4, generator=rng(2), dtype=torch.float64)
    pyro.set_rng_seed(7)
    cols = log_weights(Grid(), x, num_samples=5)
    pyro.set_rng_seed(7)
    rows = log_weights(Grid(), x, num_samples=5, data_plate="rows")
    assert cols.shape == (5, 4) and rows.shape == (5, 3)
    torch.testing.assert_close(rows.sum(-1), cols.sum(-1))


def test_log_weights_refusal_names_the_function():
    with pytest.raises(TypeError, match=r"\blog_weights\b"):
        log_weights(object(), torch.zeros(2, 3))


# -- summaries ----------------------------------------------------------------------------------


def sd_over_root_n(values):
    v = np.asarray(values, dtype=np.float64)
    return v.std(ddof=1) / math.sqrt(len(v))


def test_elbo_terms_summary_exact():
    elbo = torch.tensor([-3.0, -1.0, -2.5, -0.5])
    recon = torch.tensor([-2.0, -0.5, -1.0, 0.5])
    terms = ElboTerms(elbo, recon, recon - elbo, torch.tensor([0.12345678, 1e-8, 2.0]),
                      torch.tensor([0.5, 0.0, 0.02]), 2, False)
    kl = (recon - elbo).tolist()
    expected = {
        "elbo": -1.75, "elbo_stderr": sd_over_root_n(elbo.tolist()),
        "reconstruction": -0.75, "reconstruction_stderr": sd_over_root_n(recon.tolist()),
        "kl": float(np.mean(kl)), "kl_stderr": sd_over_root_n(kl),
        "active_units": 2, "latent_dim": 3, "analytic_kl": False,
        "kl_per_dim": [0.123457, 0.0, 2.0],
    }
    out = terms.summary()
    assert out.keys() == expected.keys()
    assert out["kl_per_dim"] == expected.pop("kl_per_dim")  # rounded to 6 decimals
    assert out["analytic_kl"] is False and out["active_units"] == 2 and out["latent_dim"] == 3
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-6), key
    terms.analytic_kl, terms.kl_per_dim = True, None
    out = terms.summary()
    assert out["analytic_kl"] is True and "kl_per_dim" not in out


class NoLatents:
    """x ~ N(0, 1) per entry, no latent site: every ELBO term is exact."""

    def model(self, x, c=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1), obs=x)

    def guide(self, x, c=None):
        pass


def test_elbo_terms_of_a_model_without_latents_are_log_p_x_without_warnings(recwarn):
    """No latent site: the ELBO and the reconstruction are log p(x), the KL is 0, and the
    per-dimension summaries have no entries (latent_dim 0), without torch's warnings."""
    x = torch.randn(6, 3, generator=rng(4), dtype=torch.float64)
    terms = elbo_terms(NoLatents(), x, num_samples=2)
    exact = dist.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(terms.elbo, exact)
    torch.testing.assert_close(terms.reconstruction, exact)
    assert terms.kl.abs().max() == 0
    assert terms.posterior_mean_variance.shape == (0,) and terms.active_units == 0
    assert terms.kl_per_dim.shape == (0,)  # no latent dims, as posterior_mean_variance
    assert not [w for w in recwarn if "degrees of freedom" in str(w.message)]


class Labels:
    """y ~ Categorical(1/3, 1/3, 1/3), x | y ~ N(y, 1) per datapoint; the guide is the point
    mass q(y | x) on round(x) (clamped to the classes), a Categorical, whose mean is NaN in
    torch: E_q[y] is then the particles' average."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(torch.full(x.shape + (3,), 1 / 3, dtype=x.dtype)))
            pyro.sample("x", dist.Normal(y.to(x.dtype), 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            label = x.round().clamp(0, 2).long()
            pyro.sample("y", dist.Categorical(torch.nn.functional.one_hot(label, 3).to(x.dtype)))


def test_elbo_terms_of_a_point_mass_discrete_guide_in_float64():
    """A float64 model whose guide is a point-mass Categorical: E_q[y] is the label round(x)
    (the average of particles that all equal it), so Cov_x(E_q[y]) is the labels' variance, in
    float64 as the other terms; the KL is log 3 and the reconstruction log N(x; label, 1)."""
    x = torch.tensor([0.1, 1.2, 2.3, 1.9, -0.4, 0.8], dtype=torch.float64)
    labels = x.round().clamp(0, 2)
    terms = elbo_terms(Labels(), x, num_samples=3)
    torch.testing.assert_close(terms.posterior_mean_variance, labels.var().reshape(1))
    torch.testing.assert_close(terms.kl, torch.full_like(x, math.log(3)))
    torch.testing.assert_close(terms.reconstruction, dist.Normal(labels, 1.0).log_prob(x))
    assert terms.analytic_kl


class FlowGuide:
    """z ~ N(0, 1), x | z ~ N(z, 1) with the exact posterior N(x / 2, 1 / 2) written as a flow,
    N(0, 1) pushed through z = x / 2 + sqrt(1/2) eps: torch's TransformedDistribution, which
    has no mean (E_q[z] is then the particles' average) and no closed-form KL."""

    def model(self, x):
        Recorder().model(x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            flow = dist.transforms.AffineTransform(x / 2, math.sqrt(0.5))
            pyro.sample("z", dist.TransformedDistribution(dist.Normal(torch.zeros_like(x), 1.0),
                                                           [flow]))


def test_posterior_means_of_a_guide_without_a_mean_average_its_particles():
    """E_q[z | x_n] of a guide without a mean is the average of K particles, x_n / 2 + e_n with
    e_n ~ N(0, 1 / (2K)): Cov_x(E_q[z]) is Var(x / 2) up to 2 Cov(x / 2, e) (standard error
    2 s sqrt(Var(x / 2) / (N - 1)), s = sqrt(1 / (2K))) and Var(e) (about s^2)."""
    k = 2000
    x = 2 * torch.randn(6, generator=rng(15), dtype=torch.float64)
    terms = elbo_terms(FlowGuide(), x, num_samples=k)
    var, s = (x / 2).var(), math.sqrt(0.5 / k)
    # 5 standard errors of the covariance term, and 5 s^2 for Var(e) (mean s^2, chi-squared)
    tolerance = 5 * 2 * s * math.sqrt(var / (len(x) - 1)) + 5 * s ** 2
    torch.testing.assert_close(terms.posterior_mean_variance, var.reshape(1), rtol=0,
                               atol=tolerance)
    assert not terms.analytic_kl


def test_inference_gap_summary_exact():
    ll = torch.tensor([-1.0, -2.0, -4.0], dtype=torch.float64)
    amortized = torch.tensor([-3.0, -2.5, -7.0], dtype=torch.float64)
    refined = torch.tensor([-1.5, -2.25, -5.0], dtype=torch.float64)
    mcse = [torch.tensor(v, dtype=torch.float64) for v in
            ([0.1, 0.2, 0.2], [0.3, 0.4, 0.0], [1.0, 1.0, 1.0])]
    gap = InferenceGap(ll, mcse[0], amortized, mcse[1], refined, mcse[2], 5000, 1000, 300)
    parts = {"log_likelihood": ll, "elbo_amortized": amortized, "elbo_refined": refined,
             "total_gap": ll - amortized, "approximation_gap": ll - refined,
             "amortization_gap": refined - amortized}
    expected = {"num_datapoints": 3, "iw_num_samples": 5000, "elbo_num_samples": 1000,
                "refinement_steps": 300}
    for name, v in parts.items():
        expected[name] = float(v.mean())
        expected[f"{name}_stderr"] = sd_over_root_n(v.tolist())
    for name, m in zip(("log_likelihood", "elbo_amortized", "elbo_refined"), mcse):
        expected[f"{name}_mcse"] = math.sqrt(float((m**2).mean()))  # root mean square
    out = gap.summary()
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-12), key


# -- the inference gap's refined guide ----------------------------------------------------------


def test_refined_guide_starts_at_the_guide_full_covariance():
    """A MultivariateNormal guide site: the refined guide's start is the guide's distribution,
    correlated Cholesky factor included (its strictly lower part and the log of its diagonal)."""
    model, x = ppca(), draw(3, 1)
    q = model.guide_distribution(x)
    assert q.scale_tril[..., 1, 0].abs().min() > 0.05  # an off-diagonal entry to keep
    refined = RefinedGuide(model, (x,))  # family="guide" by default
    (name, key, kind, event_dims, _), = refined.sites
    start = refined.distribution(key, kind, event_dims)
    torch.testing.assert_close(start.loc, q.loc)
    torch.testing.assert_close(start.scale_tril, q.scale_tril.expand(3, Q, Q))


def test_refined_guide_default_family_is_the_guides_own():
    """A diagonal guide refined with the default family stays diagonal (``"full"`` would make it
    a full-covariance Gaussian)."""
    model, x = ppca("diagonal"), draw(3, 1)
    q = model.guide_distribution(x)
    refined = RefinedGuide(model, (x,))
    (_, key, kind, event_dims, _), = refined.sites
    start = refined.distribution(key, kind, event_dims)
    assert isinstance(start, dist.Independent) and isinstance(start.base_dist, dist.Normal)
    torch.testing.assert_close(start.base_dist.scale, q.base_dist.scale.expand(3, Q))
    full = RefinedGuide(model, (x,), "full")
    assert isinstance(full.distribution(*full.sites[0][1:4]), dist.MultivariateNormal)
    with pytest.raises(ValueError, match=r"unknown family 'diag'"):
        RefinedGuide(model, (x,), "diag")


class Column:
    """A data plate at dim -2 (as nested plates put it): z ~ N(0, 1) of shape (N, 1),
    x | z ~ N(z, 1), the guide N(x / 2, 0.7)."""

    def model(self, x, c=None):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x, c=None):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x / 2, torch.full_like(x, 0.7)))


def test_refined_guide_program_uses_the_guides_plates():
    """The refined guide draws z inside the guide's plate, same name, size and dim, and at the
    start scores a draw as the guide does."""
    x = torch.randn(4, 1, generator=rng(4), dtype=torch.float64)
    refined = RefinedGuide(Column(), (x,))
    tr = pyro.poutine.trace(refined).get_trace(x)
    site = tr.nodes["z"]
    assert [(f.name, f.size, f.dim) for f in site["cond_indep_stack"]] == [("data", 4, -2)]
    assert site["value"].shape == (4, 1) and site["fn"].batch_shape == (4, 1)
    q = dist.Normal(x / 2, 0.7)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), q.log_prob(site["value"]))


class ObservingGuide(Conditional):
    """:class:`Conditional` whose guide also observes something (Pyro lets a guide hold observed
    sites, e.g. a semi-supervised guide scoring a label it is given): ``c`` at a site of its
    own. An observed site is no latent variable: it is not part of q."""

    def guide(self, x, c):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c_seen", dist.Normal(torch.zeros_like(c), 3.0), obs=c)
            pyro.sample("z", dist.Normal((x - c) / (1 + self.S2),
                                         math.sqrt(self.S2 / (1 + self.S2))))


def test_refined_guide_refines_the_latent_sites_only():
    """q* has free parameters for the guide's latent sites alone and its program draws them
    alone: a guide's observed site is data, not a member of the family. Started at the exact
    posterior (no steps), every log weight is log p(x | c), so log p(x | c) and both ELBOs are
    exact (a refined guide that drew ``c_seen`` too would subtract its log-density)."""
    x, c = conditional_data()
    refined = RefinedGuide(ObservingGuide(), (x, c))
    assert [name for name, *_ in refined.sites] == ["z"]
    tr = pyro.poutine.trace(refined).get_trace(x, c)
    assert [n for n, site in tr.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)] == ["z"]
    gap = inference_gap(ObservingGuide(), x, c=c, num_steps=0, num_elbo_samples=3,
                        num_samples=3)
    exact = Conditional().log_marginal(x, c)
    for value in (gap.log_likelihood, gap.elbo_amortized, gap.elbo_refined):
        torch.testing.assert_close(value, exact)


# -- inference_gap --------------------------------------------------------------------------------


def test_inference_gap_of_a_conditional_model_with_the_exact_guide():
    """The guide is p(z | x, c): log p(x | c), both ELBOs and every gap are exact, whatever the
    draws (every log weight equals log p(x | c)), and the MCSEs are 0."""
    x, c = conditional_data()
    gap = inference_gap(Conditional(), x, c=c, num_steps=0, num_elbo_samples=3, num_samples=3)
    exact = Conditional().log_marginal(x, c)
    for value in (gap.log_likelihood, gap.elbo_amortized, gap.elbo_refined):
        torch.testing.assert_close(value, exact)
    for mcse in (gap.log_likelihood_mcse, gap.elbo_amortized_mcse, gap.elbo_refined_mcse):
        assert (mcse.abs() < 1e-6).all()


def test_inference_gap_defaults_are_the_documented_ones():
    model, x = ppca(), draw(2, 2)
    with torch.no_grad():
        model.b.add_(0.2)  # something to refine
    default = inference_gap(model, x)
    explicit = inference_gap(model, x, num_steps=500, lr=0.05, num_particles=32,
                             num_elbo_samples=1000, num_samples=5000, family="guide", seed=0)
    assert default.summary() == explicit.summary()
    for name in ("log_likelihood", "elbo_amortized", "elbo_refined"):
        assert torch.equal(getattr(default, name), getattr(explicit, name))
    assert (default.num_samples, default.num_elbo_samples, default.num_steps) == (5000, 1000, 500)


@pytest.mark.parametrize("name", ["num_particles", "num_elbo_samples", "num_samples"])
def test_inference_gap_counts_at_least_one(name):
    model, x = ppca(), draw(2, 2)
    kwargs = dict(num_steps=1, num_particles=1, num_elbo_samples=1, num_samples=1)
    gap = inference_gap(model, x, **kwargs)  # one of each is enough
    assert gap.log_likelihood.shape == (2,)
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got 0"):
        inference_gap(model, x, **{**kwargs, name: 0})


def test_inference_gap_refusals_name_what_is_wrong():
    model, x = ppca(), draw(2, 2)
    with pytest.raises(ValueError, match=r"^num_steps must be an integer >= 0, got -1"):
        inference_gap(model, x, num_steps=-1)
    inference_gap(model, x, num_steps=0, num_elbo_samples=1, num_samples=1)  # 0 steps: q* = q
    for lr in (0.0, -0.1):
        with pytest.raises(ValueError, match=r"^lr must be .*> 0"):
            inference_gap(model, x, lr=lr, num_steps=0)
    with pytest.raises(TypeError, match=r"^inference_gap needs"):
        inference_gap(object(), x)


# -- PPCA's guide -----------------------------------------------------------------------------


def test_ppca_guide_scale_tril_of_a_diagonal_guide():
    model = ppca("diagonal")
    expected = torch.diag(model.log_scale.exp())
    torch.testing.assert_close(model.guide_scale_tril(), expected)
    torch.testing.assert_close(model.guide_scale_tril().diagonal() ** 2,
                               SIGMA2 / model._M().diagonal())  # the mean-field optimum


def test_ppca_guide_scale_tril_diagonal_stays_positive():
    """However negative the raw diagonal, the Cholesky factor keeps a positive diagonal (the
    floor 1e-6), so that the guide stays a valid Gaussian."""
    model = PPCA(D, Q, guide="full").double()
    with torch.no_grad():
        model.scale_tril_raw.fill_(-100.0)
    L = model.guide_scale_tril()
    assert (L.diagonal() > 0).all(), L
    torch.testing.assert_close(L.diagonal(), torch.full((Q,), 1e-6, dtype=torch.float64))


def test_inference_gap_leaves_the_model_untouched():
    """The model's parameters stay fixed: same values, no gradient left in them, requires_grad
    restored."""
    model, x = ppca(), draw(3, 2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inference_gap(model, x, num_steps=3, num_particles=2, num_elbo_samples=2, num_samples=2)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad, name
        assert torch.equal(p.detach(), before[name]), name


# -- PPCA's model -------------------------------------------------------------------------------


def test_ppca_model_observes_site_x_and_checks_its_data():
    """The observed site is "x" (as documented) holding the data; NaN data are refused unless
    inside ``trusted_inputs`` (a training loop that checked the whole dataset once)."""
    from pvae.contract import trusted_inputs

    model, x = ppca(), draw(3, 2)
    tr = pyro.poutine.trace(model.model).get_trace(x)
    assert tr.nodes["x"]["is_observed"] and torch.equal(tr.nodes["x"]["value"], x)
    assert tr.nodes["z"]["value"].shape == (3, Q)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.model(bad)
    with trusted_inputs(), pyro.validation_enabled(False):
        model.model(bad)  # the per-call check is skipped


def test_ppca_refusals_name_what_is_wrong():
    PPCA(2, 1)  # the smallest PPCA
    with pytest.raises(ValueError, match=r"^x_dim must be an integer >= 2, got 1$"):
        PPCA(1, 1)
    with pytest.raises(TypeError, match=r"^latent_dim must be an integer"):
        PPCA(3, 1.5)
    with pytest.raises(ValueError, match=r"^PPCA needs 1 <= latent_dim < x_dim"):
        PPCA(3, 0)
    with pytest.raises(ValueError, match=r"^unknown guide 'diag'"):
        PPCA(3, 1, guide="diag")
    with pytest.raises(ValueError, match=r"^x contains NaN or inf values"):
        ppca().log_marginal(torch.full((2, D), float("nan"), dtype=torch.float64))


# -- evaluation's refusals ------------------------------------------------------------------------


def test_evaluation_refusals_name_what_is_wrong():
    from torch.utils.data import DataLoader, TensorDataset

    from pvae.inference import elbo_terms, iw_log_likelihood

    model, x = ppca(), draw(4, 2)
    loader = DataLoader(TensorDataset(x), batch_size=2)
    for fn, who in ((iw_log_likelihood, "iw_log_likelihood"), (elbo_terms, "elbo_terms")):
        with pytest.raises(ValueError, match=rf"^{who} got a DataLoader, .*pass c=None"):
            fn(model, loader, c=x[:, 0], num_samples=2)
        with pytest.raises(ValueError, match=r"^a DataLoader's batches are its own: pass "
                                             r"batch_size=None$"):
            fn(model, loader, batch_size=2, num_samples=2)
        for observed in ((), ("z",), "y"):
            with pytest.raises(ValueError, match=r"^observed must name some of the model's "
                                                 r"observed sites \['x'\], got"):
                fn(model, x, num_samples=2, observed=observed)
        with pytest.raises(TypeError, match=rf"^{who} needs an object"):
            fn(object(), loader)
    for distributed in ("yes", None, 2):
        with pytest.raises(ValueError, match=r"^distributed must be 'auto', True or False"):
            iw_log_likelihood(model, x, num_samples=2, distributed=distributed)
    with pytest.raises(ValueError, match=r"^distributed=True needs a torch.distributed"):
        iw_log_likelihood(model, x, num_samples=2, distributed=True)
    for distributed in ("auto", False):  # one process: everything computed here
        iw_log_likelihood(model, x, num_samples=2, distributed=distributed)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluation_of_a_data_loader_is_that_of_its_tensor(batch_size):
    """A DataLoader's items are the passes: with a seed, the same per-datapoint IW values as the
    tensor cut into passes of the loader's batch size (observed="x" is every site here; items
    of one row included), and the same closed-form KL and posterior means in elbo_terms."""
    from torch.utils.data import DataLoader, TensorDataset

    from pvae.inference import elbo_terms, iw_log_likelihood

    model, x = ppca(), draw(5, 2)
    with torch.no_grad():
        model.b.add_(0.5)  # a guide that is not exact: the weights vary
    loader = DataLoader(TensorDataset(x), batch_size=batch_size)
    a = iw_log_likelihood(model, loader, num_samples=6, seed=3)
    b = iw_log_likelihood(model, x, num_samples=6, seed=3, batch_size=batch_size, observed="x")
    torch.testing.assert_close(a.per_datapoint, b.per_datapoint)
    torch.testing.assert_close(a.ess, b.ess)
    a = elbo_terms(model, loader, num_samples=3)
    b = elbo_terms(model, x, num_samples=3, batch_size=batch_size)
    for name in ("kl", "posterior_mean_variance"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    assert a.analytic_kl and b.analytic_kl


def test_evaluation_of_one_datapoint():
    """x of one row: the IW estimate and the log weights are the exact log p(x) (the guide is
    the exact posterior), and the ELBO terms are those of that row evaluated among others (the
    closed-form KL), with no variance of the posterior means over one datapoint."""
    from pvae.inference import elbo_terms, iw_log_likelihood

    model, x = ppca(), draw(3, 4)
    one = x[:1]
    exact = model.log_marginal(one).detach()
    close = dict(rtol=0, atol=1e-4)  # the guide's Cholesky floor (see the log_weights test)
    torch.testing.assert_close(iw_log_likelihood(model, one, num_samples=3).per_datapoint,
                               exact, **close)
    torch.testing.assert_close(log_weights(model, one, num_samples=2).detach(),
                               exact.expand(2, -1), **close)
    terms = elbo_terms(model, one, num_samples=2)
    torch.testing.assert_close(terms.kl, elbo_terms(model, x, num_samples=2).kl[:1])
    torch.testing.assert_close(terms.posterior_mean_variance, torch.zeros(Q, dtype=x.dtype))
    assert terms.active_units == 0


def test_evaluation_of_a_data_loader_places_its_items_as_the_model():
    """float32 items for a float64 model are cast to float64 (as a tensor x is), and a device
    that is asked for is honoured (or refused where there is none)."""
    from torch.utils.data import DataLoader, TensorDataset

    from pvae.inference import iw_log_likelihood

    model, x = ppca(), draw(4, 2)
    loader = DataLoader(TensorDataset(x.float()), batch_size=2)
    a = iw_log_likelihood(model, loader, num_samples=3, seed=1)
    b = iw_log_likelihood(model, x.float(), num_samples=3, seed=1, batch_size=2)
    assert a.per_datapoint.dtype == torch.float64
    torch.testing.assert_close(a.per_datapoint, b.per_datapoint)
    if torch.cuda.is_available():
        r = iw_log_likelihood(model.cuda(), loader, num_samples=3, device="cuda")
        assert r.per_datapoint.is_cuda
    else:
        with pytest.raises(ValueError, match=r"^device='cuda' was asked for but CUDA is not"):
            iw_log_likelihood(model, loader, num_samples=3, device="cuda")


def test_mean_stderr_of_one_value_is_nan_without_a_warning():
    """One value: no error estimate, NaN, and no warning from torch's std of one value."""
    import warnings

    from pvae.stats import mean_stderr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, stderr = mean_stderr(torch.tensor([2.5]))
    assert mean == 2.5 and math.isnan(stderr)


class Recorder:
    """z ~ N(0, I), x | z ~ N(z, I) per datapoint (x: ``(N,)`` or ``(N, D)``) with the exact
    posterior N(x / 2, I / 2) as guide, in a data plate that may subsample itself; the guide
    records the particles and the rows (particles x datapoints) of every trace."""

    def __init__(self, subsample_size=None):
        self.subsample_size, self.particles, self.rows = subsample_size, [], []

    def model(self, x):
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x[idx]), 1.0).to_event(x.dim() - 1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(x.dim() - 1), obs=x[idx])

    def guide(self, x):
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(x[idx] / 2, math.sqrt(0.5)).to_event(x.dim() - 1))
        self.particles.append(z.shape[0] if z.dim() > x.dim() else 1)
        self.rows.append(z.numel() // x[0].numel())


@pytest.mark.parametrize("subsample_size", [None, 3, 1])
@pytest.mark.parametrize("loader", [False, True])
def test_evaluation_honours_chunk_size(subsample_size, loader):
    """chunk_size bounds the particles per trace (and so memory), for a tensor or a DataLoader,
    and in a data plate that subsamples itself (of 3 datapoints, or of 1: on a first probe of
    one datapoint that plate draws nothing); with the exact posterior every estimate is
    log p(x) = log N(x; 0, 2) whatever the chunks, one per datapoint."""
    from torch.utils.data import DataLoader, TensorDataset

    from pvae.inference import iw_log_likelihood

    x = torch.randn(6, generator=rng(8), dtype=torch.float64)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    for chunk_size in (2, None):
        program = Recorder(subsample_size)
        data = DataLoader(TensorDataset(x), batch_size=6) if loader else x
        r = iw_log_likelihood(program, data, num_samples=5, chunk_size=chunk_size,
                              batch_size=None if loader else 6)
        # a program without parameters runs a DataLoader's items in torch's default dtype
        torch.testing.assert_close(r.per_datapoint.double(), exact, rtol=0, atol=1e-5)
        if chunk_size is not None:
            assert max(program.particles) <= chunk_size, program.particles
        else:
            assert max(program.particles) == 5, program.particles  # all in one trace: they fit


@pytest.mark.parametrize("case", ["data loader", "self-subsampling plate"])
def test_default_chunks_keep_a_trace_within_the_devices_rows(case, monkeypatch):
    """Without chunk_size, a trace holds at most pass_rows(device, width) rows (particles x
    datapoints), the budget that bounds memory: for a DataLoader, read off the width and the
    number of its items' rows (300 here, more than a tensor's default pass of 250), and for a
    data plate that subsamples itself, counted in the plate's subsample of 3 (not in the pass
    of batch_size=1 datapoint that it outgrows). The budget per 784 pixels is shrunk from
    thousands of rows so that small data show it; the estimates are still log N(x; 0, 2) per
    entry (the guide is the exact posterior)."""
    from torch.utils.data import DataLoader, TensorDataset

    from pvae.inference import iw_log_likelihood, sizes

    if case == "data loader":
        monkeypatch.setattr(sizes, "CPU_ROWS_AT_784", 11)
        x = torch.randn(300, 8, generator=rng(12))
        program, data, kwargs = Recorder(), DataLoader(TensorDataset(x), batch_size=300), {}
        num_samples = 8
    else:
        monkeypatch.setattr(sizes, "CPU_ROWS_AT_784", 1)
        x = torch.randn(6, generator=rng(12), dtype=torch.float64)
        program, data, kwargs = Recorder(3), x, {"batch_size": 1}
        num_samples = 300
    budget = sizes.pass_rows(x.device, x[0].numel())
    assert num_samples * len(x) > budget  # (not every particle fits in one trace)
    r = iw_log_likelihood(program, data, num_samples=num_samples, **kwargs)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).reshape(len(x), -1).sum(-1)
    torch.testing.assert_close(r.per_datapoint, exact.to(r.per_datapoint.dtype), rtol=1e-6,
                               atol=1e-5)
    assert max(program.rows) <= budget, (program.rows, budget)


def test_data_plate_named_for_a_data_loader():
    """A DataLoader batches the rows: with data_plate="rows" there is one estimate per row,
    and each is the sum over its cells of log N(x; 0, 2) (the guide is the exact posterior);
    the plate found by default ("data") would give one per column and pass."""
    from torch.utils.data import DataLoader, TensorDataset

    from pvae.inference import iw_log_likelihood

    class ExactGrid(Grid):
        def guide(self, x):
            with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("z", dist.Normal(x / 2, torch.full_like(x, math.sqrt(0.5))))

    x = torch.randn(5, 4, generator=rng(9), dtype=torch.float64)
    loader = DataLoader(TensorDataset(x), batch_size=2)
    r = iw_log_likelihood(ExactGrid(), loader, num_samples=3, data_plate="rows")
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)
    torch.testing.assert_close(r.per_datapoint.double(), exact, rtol=0, atol=1e-4)


def test_a_plate_that_subsamples_more_than_a_pass_gets_all_of_x():
    """subsample_size=3 does not fit passes of 2 datapoints: the program gets the whole of x in
    one pass (it holds 3 datapoints at a time itself), and every datapoint is estimated."""
    from pvae.inference import iw_log_likelihood

    x = torch.randn(6, generator=rng(8), dtype=torch.float64)
    r = iw_log_likelihood(Recorder(3), x, num_samples=4, batch_size=2)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    torch.testing.assert_close(r.per_datapoint.double(), exact, rtol=0, atol=1e-5)
    # a DataLoader's items are its own: Pyro's refusal of the plate is raised as it is
    from torch.utils.data import DataLoader, TensorDataset

    with pytest.raises(ValueError, match="subsample_size does not match len"):
        iw_log_likelihood(Recorder(3), DataLoader(TensorDataset(x), batch_size=2), num_samples=4)


def test_a_self_subsampling_plate_gets_all_of_x_whatever_the_last_pass():
    """Passes of 5 would leave a last pass of 2 datapoints, fewer than the plate's
    subsample_size=3 (and index the plate beyond it): the program gets the whole of x in one
    pass, for the IW estimate and the ELBO terms alike."""
    from pvae.inference import iw_log_likelihood

    x = torch.randn(7, generator=rng(8), dtype=torch.float64)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    for batch_size in (5, None):
        r = iw_log_likelihood(Recorder(3), x, num_samples=4, batch_size=batch_size)
        torch.testing.assert_close(r.per_datapoint.double(), exact, rtol=0, atol=1e-5)
        pyro.set_rng_seed(0)
        terms = elbo_terms(Recorder(3), x, num_samples=2000, batch_size=batch_size)
        # q = N(x/2, 1/2): KL(q || N(0, 1)) in closed form, and E_q[log N(x; z, 1)] =
        # -log(2 pi)/2 - (x^2/4 + 1/2)/2, estimated with a standard error below 0.025
        kl = 0.5 * (0.5 + x ** 2 / 4 - 1 - math.log(0.5))
        torch.testing.assert_close(terms.kl, kl, rtol=0, atol=1e-9)
        recon = -0.5 * math.log(2 * math.pi) - 0.5 * (x ** 2 / 4 + 0.5)
        torch.testing.assert_close(terms.reconstruction, recon, rtol=0, atol=0.15)


class SubsampledRows:
    """x: (rows, cols), z and x per entry inside the plates "rows" (dim -2), which draws
    subsamples of 3 rows, and "data" (dim -1, the columns): z ~ N(0, 1), x | z ~ N(z, 1), the
    exact posterior N(x / 2, 1 / 2) as guide. The data plate is "data" unless ``data_plate``
    names "rows"."""

    def model(self, x):
        with pyro.plate("rows", x.shape[0], subsample_size=3, dim=-2) as idx, \
                pyro.plate("data", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x[idx]), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(self, x):
        with pyro.plate("rows", x.shape[0], subsample_size=3, dim=-2) as idx, \
                pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(x[idx] / 2, math.sqrt(0.5)))


def test_the_named_data_plate_holds_when_it_outgrows_the_passes():
    """data_plate="rows" names a plate that subsamples 3 rows, more than passes of 2 hold: the
    programs get all of x in one pass and the named plate stays the data plate (not "data",
    which a search without the name would pick): one estimate per row, the sum over its
    entries of log N(x; 0, 2)."""
    from pvae.inference import iw_log_likelihood

    x = torch.randn(6, 4, generator=rng(13), dtype=torch.float64)
    r = iw_log_likelihood(SubsampledRows(), x, num_samples=3, batch_size=2, data_plate="rows")
    # (atol: Normal(0.0, sqrt(2)) holds its Python floats in float32)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)
    torch.testing.assert_close(r.per_datapoint, exact, rtol=0, atol=1e-5)


def test_observed_given_as_one_name():
    """observed="pixels" is the one site "pixels" (not its letters)."""

    class Named:
        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
                pyro.sample("pixels", dist.Normal(z, 1.0), obs=x)

        def guide(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    x = torch.randn(4, generator=rng(6), dtype=torch.float64)
    lw = log_weights(Named(), x, num_samples=2, observed="pixels")
    torch.testing.assert_close(lw, dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).expand(2, -1))


# -- the probe of the layout and the first item of a DataLoader ------------------------------------


class ConcatDecoder:
    """A conditional VAE whose encoder reads ``cat([x, c], -1)`` and decoder ``cat([z, c], -1)``
    (``c`` expanded to z's leading dims, as a decoder over particles does): z ~ N(0, 1),
    x | z, c ~ N(z + c, S2), so the exact posterior and p(x | c) are those of
    :class:`Conditional`; x, c and z are ``(N, 1)``."""

    S2 = Conditional.S2

    def model(self, x, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            h = torch.cat([z, c.expand(*z.shape[:-1], c.shape[-1])], -1)
            pyro.sample("x", dist.Normal(h.sum(-1, keepdim=True), math.sqrt(self.S2))
                        .to_event(1), obs=x)

    def guide(self, x, c):
        h = torch.cat([x, c], -1)  # the encoder reads (x, c) as one input
        loc = (h[..., :1] - h[..., 1:]) / (1 + self.S2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, math.sqrt(self.S2 / (1 + self.S2))).to_event(1))


def test_the_layout_probe_gives_the_programs_one_datapoint_of_x_and_of_c():
    """The layout is found on the first datapoint, x[:1] with c[:1]: an encoder and a
    decoder that concatenate x or z with c (tensor operations that need c's rows to be theirs,
    unlike a broadcast) run there, and every estimate is the exact log p(x | c) of the exact
    posterior."""
    from pvae.inference import iw_log_likelihood

    x, c = (t.unsqueeze(-1) for t in conditional_data())
    exact = Conditional().log_marginal(x, c).squeeze(-1)
    torch.testing.assert_close(log_weights(ConcatDecoder(), x, c=c, num_samples=3),
                               exact.expand(3, -1))
    r = iw_log_likelihood(ConcatDecoder(), x, c=c, num_samples=3, batch_size=2)
    torch.testing.assert_close(r.per_datapoint, exact)


class DictBatch:
    """Programs of one argument, a dict ``{"x": (N,)}`` (a DataLoader over a dataset of dicts):
    z ~ N(0, 1), x | z ~ N(z, 1), the exact posterior N(x / 2, 1 / 2) as guide."""

    def model(self, batch):
        x = batch["x"]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, batch):
        x = batch["x"]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))


def test_a_data_loader_whose_items_are_no_tensors():
    """A DataLoader's first argument need not be a tensor (here a dict of tensors, collated
    from a dataset of dicts): its size is not read off it, and every estimate is
    log p(x) = log N(x; 0, 2) (the guide is the exact posterior)."""
    from torch.utils.data import DataLoader

    from pvae.inference import iw_log_likelihood

    x = torch.randn(5, generator=rng(10), dtype=torch.float64)
    loader = DataLoader([{"x": v} for v in x], batch_size=2)
    r = iw_log_likelihood(DictBatch(), loader, num_samples=3)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    torch.testing.assert_close(r.per_datapoint.double(), exact, rtol=0, atol=1e-5)
    terms = elbo_terms(DictBatch(), loader, num_samples=2)
    # KL(N(x/2, 1/2) || N(0, 1)) in closed form
    kl = 0.5 * (0.5 + x ** 2 / 4 - 1 - math.log(0.5))
    torch.testing.assert_close(terms.kl.double(), kl, rtol=0, atol=1e-5)


class Batch:
    """A batch with its own ``.to``, as HuggingFace's ``BatchEncoding``: it moves to the device
    it is given and refuses anything that is not one."""

    def __init__(self, rows):
        self.x = torch.stack(rows) if isinstance(rows, list) else rows

    def to(self, device):
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"Batch.to needs a device, got {device!r}")
        return Batch(self.x.to(device))


def test_a_data_loader_item_with_its_own_to_goes_to_the_models_device():
    """An item that is an object with ``.to`` (here a :class:`Batch`) is placed with
    ``.to(device)``, the model's device, as the tensors of an item are; every estimate is then
    log p(x) = log N(x; 0, 2) (the guide is the exact posterior)."""
    from torch.utils.data import DataLoader

    from pvae.inference import iw_log_likelihood

    class OfBatch:
        def model(self, batch):
            DictBatch().model({"x": batch.x})

        def guide(self, batch):
            DictBatch().guide({"x": batch.x})

    x = torch.randn(5, generator=rng(14), dtype=torch.float64)
    loader = DataLoader(list(x), batch_size=2, collate_fn=Batch)
    r = iw_log_likelihood(OfBatch(), loader, num_samples=3)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    torch.testing.assert_close(r.per_datapoint.double(), exact, rtol=0, atol=1e-5)


class Counting(Recorder):
    """:class:`Recorder` counting the guide's runs (a run stops at a plate that Pyro refuses)."""

    def __init__(self, subsample_size=None):
        super().__init__(subsample_size)
        self.calls = 0

    def guide(self, x):
        self.calls += 1
        super().guide(x)


@pytest.mark.parametrize("n", [1, 2])
def test_a_plate_that_subsamples_more_than_all_of_x_is_refused_without_a_retry(n):
    """subsample_size=3 with 2 datapoints in all: no pass can hold it, the whole of x
    included, so Pyro's refusal is raised once the probe (one datapoint) and the first pass
    (all of x) have failed, without tracing all of x again; the guide runs as often as
    :func:`~pvae.inference.traces.layout` runs it on those two inputs. With one datapoint in
    all, the probe is all of x: it is traced once."""
    from pvae.inference import iw_log_likelihood
    from pvae.inference.traces import layout

    x = torch.randn(n, generator=rng(11), dtype=torch.float64)
    expected = 0
    for args in ((x[:1],), (x,)) if n > 1 else ((x,),):
        program = Counting(3)
        with pytest.raises(ValueError, match="subsample_size does not match len"):
            layout(program.model, program.guide, args)
        expected += program.calls
    for evaluate in (iw_log_likelihood, elbo_terms, log_weights):
        program = Counting(3)
        with pytest.raises(ValueError, match="subsample_size does not match len"):
            evaluate(program, x, num_samples=2)
        assert program.calls == expected, (evaluate.__name__, program.calls, expected)
