"""Reported standard errors against the truth: every error bar pvae prints (the IW estimate's,
the ELBO terms', the inference gap's and the PPCA comparison's) is checked against the sampling
spread it claims to describe, measured independently by repeating the estimate over R datasets
drawn from the model, or over R seeds on the same data. The reported SE^2 (averaged over the
repeats) must match the empirical variance of the R estimates within a chi-square band:

    var_R / SE^2  in  [chi2.ppf(0.0005, R - 1), chi2.ppf(0.9995, R - 1)] / (R - 1),

which holds with probability 0.999 for Gaussian estimates; a standard error off by a factor of
sqrt(N) (or any factor outside about [0.8, 1.2]) falls outside it. Nothing here takes its
tolerance from the estimate under test.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from pvae.inference import elbo_terms, inference_gap, iw_log_likelihood
from pvae.models import PPCA, compare_posteriors
from pvae.stats import mean_stderr

from conftest import rng

D, Q, SIGMA2 = 4, 2, 0.5
W = [[1.0, 0.0], [0.5, 1.0], [0.0, 0.7], [0.3, -0.4]]
MU = [1.0, -1.0, 0.5, 2.0]


def ppca(perturbed: bool = True) -> PPCA:
    """A PPCA with fixed, known parameters (float64): p(x) = N(MU, W W^T + SIGMA2 I). Its guide
    is the exact posterior, or (``perturbed``) one shifted and widened, so that importance
    weights and ELBO draws vary (a guide wider than the posterior: bounded weights)."""
    model = PPCA(D, Q, guide="full").double()
    with torch.no_grad():
        model.W.copy_(torch.tensor(W, dtype=torch.float64))
        model.mu.copy_(torch.tensor(MU, dtype=torch.float64))
        model.log_sigma.fill_(0.5 * math.log(SIGMA2))
    model.set_guide_to_optimum()
    if perturbed:
        with torch.no_grad():
            model.A.mul_(0.8)
            model.b.add_(0.3)
            model.scale_tril_raw.add_(0.3)
    return model


def draw(n: int, seed: int) -> torch.Tensor:
    """``n`` datapoints from the model's p(x), float64."""
    g = rng(seed)
    w = torch.tensor(W, dtype=torch.float64)
    z = torch.randn(n, Q, generator=g, dtype=torch.float64, device=g.device)
    e = torch.randn(n, D, generator=g, dtype=torch.float64, device=g.device)
    return z @ w.T.to(z.device) + torch.tensor(MU, dtype=torch.float64, device=z.device) \
        + math.sqrt(SIGMA2) * e


def band(dof: int) -> tuple[float, float]:
    """The 99.9% interval of var_R / sigma^2 for R - 1 = ``dof`` degrees of freedom."""
    return chi2.ppf(0.0005, dof) / dof, chi2.ppf(0.9995, dof) / dof


def assert_matches_spread(estimates, reported_se, what: str) -> None:
    """The empirical variance of R repeated ``estimates`` over the mean reported SE^2."""
    est = np.asarray(estimates, dtype=np.float64)
    se = np.asarray(reported_se, dtype=np.float64)
    ratio = est.var(ddof=1) / np.mean(se**2)
    lo, hi = band(len(est) - 1)
    assert lo < ratio < hi, f"{what}: empirical var / reported SE^2 = {ratio:.4g}, " \
                            f"outside [{lo:.3f}, {hi:.3f}] (R = {len(est)})"


# -- pvae.stats.mean_stderr ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 7, 1000])
def test_mean_stderr_is_numpys_sd_over_root_n(n):
    values = torch.randn(n, generator=rng(n), device=rng(n).device) * 3.0 + 1.0
    v = values.double().cpu().numpy()
    mean, stderr = mean_stderr(values)
    assert mean == pytest.approx(v.mean(), rel=1e-12, abs=1e-12)
    assert stderr == pytest.approx(v.std(ddof=1) / math.sqrt(n), rel=1e-10)
    # float32 input is summarized in float64
    assert mean_stderr(values.float())[1] == pytest.approx(stderr, rel=1e-6)


def test_mean_stderr_of_one_value_is_nan_and_of_none_an_error():
    mean, stderr = mean_stderr(torch.tensor([2.5]))
    assert mean == 2.5 and math.isnan(stderr)
    with pytest.raises(ValueError, match="empty"):
        mean_stderr(torch.tensor([]))


def test_mean_stderr_describes_the_spread_of_means():
    """The standard error of N iid N(0, 4) draws is 2 / sqrt(N): over R = 400 repeats the
    means spread as mean_stderr says."""
    g = rng(1)
    draws = 2.0 * torch.randn(400, 25, generator=g, dtype=torch.float64, device=g.device)
    results = [mean_stderr(row) for row in draws]
    assert_matches_spread([m for m, _ in results], [s for _, s in results], "mean_stderr")
    # and the reported SE itself is close to the closed form 2 / 5 on average
    assert np.mean([s for _, s in results]) == pytest.approx(0.4, rel=0.05)


# -- IWResult ------------------------------------------------------------------------------------


def test_iw_stderr_over_datapoints_matches_the_spread_over_datasets():
    """IWResult.stderr is the SE of the mean over datapoints: with R = 100 datasets of N = 40
    drawn from the model (and a fresh seed each), the IW means (K = 4, a non-exact guide: data
    and Monte Carlo noise together) spread as the reported stderr says."""
    model = ppca()
    means, ses = [], []
    for r in range(100):
        res = iw_log_likelihood(model, draw(40, 100 + r), num_samples=4, seed=r)
        means.append(res.mean)
        ses.append(res.stderr)
    assert_matches_spread(means, ses, "IWResult.stderr")


def test_iw_monte_carlo_error_as_pvae_ppca_reports_it():
    """``pvae ppca`` reports IW - exact as mean_stderr of the per-datapoint differences: on the
    same N = 40 datapoints over R = 60 seeds (only the Monte Carlo noise varies), the mean
    difference spreads as that SE says."""
    model = ppca()
    x = draw(40, 7)
    exact = model.log_marginal(x).double()
    diffs, ses = [], []
    for r in range(60):
        res = iw_log_likelihood(model, x, num_samples=4, seed=r)
        m, s = mean_stderr(res.per_datapoint.double() - exact)
        diffs.append(m)
        ses.append(s)
    assert_matches_spread(diffs, ses, "IW - exact stderr")


# -- ElboTerms.summary ---------------------------------------------------------------------------


def test_elbo_terms_stderrs_match_the_spread_over_datasets():
    """ELBO, reconstruction and KL of R = 200 datasets of N = 40 (one particle each): each
    mean over datapoints spreads as its reported stderr says."""
    model = ppca()
    rows = []
    for r in range(200):
        torch.manual_seed(r)
        rows.append(elbo_terms(model, draw(40, 1000 + r), num_samples=1).summary())
    for name in ("elbo", "reconstruction", "kl"):
        assert_matches_spread([s[name] for s in rows], [s[f"{name}_stderr"] for s in rows],
                              f"ElboTerms.summary {name}_stderr")


# -- InferenceGap --------------------------------------------------------------------------------

GAP_KWARGS = dict(num_steps=0, num_elbo_samples=64, num_samples=128)


def test_gap_per_datapoint_mcse_matches_the_spread_over_seeds():
    """The per-datapoint Monte Carlo errors of the inference gap's three estimates, on fixed
    data over R = 30 seeds: pooled over the 8 datapoints (independent draws), the variance of
    each estimate over seeds matches the mean reported MCSE^2 within the chi-square band of
    8 x 29 degrees of freedom. ``num_steps=0``: q* is the guide's output, so the seed moves
    only the Monte Carlo draws (the IW MCSE is the delta method's, sqrt((K/ESS - 1) / K), for a
    guide wider than the posterior whose weights are light-tailed)."""
    model = ppca()
    x = draw(8, 3)
    gaps = [inference_gap(model, x, seed=r, **GAP_KWARGS) for r in range(30)]
    for name in ("log_likelihood", "elbo_amortized", "elbo_refined"):
        est = torch.stack([getattr(g, name) for g in gaps]).double()          # (R, n)
        mcse = torch.stack([getattr(g, f"{name}_mcse") for g in gaps]).double()
        ratio = (est.var(0) / mcse.pow(2).mean(0)).mean().item()
        lo, hi = band(est.shape[1] * (est.shape[0] - 1))
        assert lo < ratio < hi, f"{name}_mcse: var over seeds / MCSE^2 = {ratio:.4g}, " \
                                f"outside [{lo:.3f}, {hi:.3f}]"


def test_gap_summary_stderrs_match_the_spread_over_datasets():
    """InferenceGap.summary's standard errors over datapoints: R = 40 datasets of N = 20."""
    model = ppca()
    rows = [inference_gap(model, draw(20, 500 + r), seed=r, **GAP_KWARGS).summary()
            for r in range(40)]
    for name in ("log_likelihood", "elbo_amortized", "total_gap"):
        assert_matches_spread([s[name] for s in rows], [s[f"{name}_stderr"] for s in rows],
                              f"InferenceGap.summary {name}_stderr")
    # the summary's *_mcse is the root-mean-square of the per-datapoint MCSE
    gap = inference_gap(model, draw(20, 500), seed=0, **GAP_KWARGS)
    rms = gap.elbo_amortized_mcse.double().pow(2).mean().sqrt().item()
    assert gap.summary()["elbo_amortized_mcse"] == pytest.approx(rms, rel=1e-12)


# -- PPCA comparison -----------------------------------------------------------------------------


def test_posterior_comparison_stderrs_match_the_spread_over_datasets():
    """compare_posteriors' summary (what ``pvae ppca`` prints as KL ± SE) on R = 300 datasets of
    N = 50, with a guide whose mean is off by an amount that varies with x."""
    model = ppca()
    rows = [compare_posteriors(model, draw(50, 2000 + r)).summary() for r in range(300)]
    for name in ("kl_q_p", "kl_p_q", "mean_error"):
        assert_matches_spread([s[name] for s in rows], [s[f"{name}_stderr"] for s in rows],
                              f"PosteriorComparison.summary {name}_stderr")
