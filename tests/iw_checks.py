"""Two-sided checks of :func:`pvae.inference.iw_log_likelihood` on a model without a closed-form
log p(x) (issue 31): the estimate at K = 1 is the ELBO, it rises with K, and it stays within
standard errors of a K = 10^4 reference that the test computes itself from
:func:`pvae.inference.log_weights` (so a bug in the estimator's own reduction, an offset of
log K say, shows up as a gap to that reference).

Every tolerance comes from a spread measured apart from the value it bounds: the spread of the
estimator over seeds, and the delta-method standard error of the reference's log-mean-exp,
sqrt((K / ESS - 1) / K), from the reference's own weights.
"""

import math

import torch

from pvae.inference import iw_log_likelihood, log_weights


def reference(model, x, c=None, num_samples=10_000, seed=12345):
    """log p(x) per datapoint from ``num_samples`` log weights reduced here, with its standard
    error, the relative variance of the weights Var(w) / E[w]^2 and the ELBO (mean log weight)
    with its standard error."""
    torch.manual_seed(seed)
    with torch.no_grad():
        lw = log_weights(model, x, c=c, num_samples=num_samples).double()  # (K, N)
    K = lw.shape[0]
    ref = torch.logsumexp(lw, 0) - math.log(K)
    w = torch.softmax(lw, 0)
    rel_var = K * (w * w).sum(0) - 1  # K / ESS - 1
    return dict(ref=ref, ref_se=(rel_var / K).sqrt(), rel_var=rel_var, elbo=lw.mean(0),
                elbo_se=lw.std(0) / math.sqrt(K))


def _mean_and_se(per_datapoint_se):
    return math.sqrt((per_datapoint_se ** 2).sum().item()) / len(per_datapoint_se)


def check_iw_rises_to_reference(model, x, c=None, ks=(1, 10, 100), seeds=10, exact=None):
    """Assert, on the mean over the datapoints of ``x`` (a few: the reference costs 10^4
    particles each), that IW(1) equals the ELBO, IW(K) does not fall as K grows, IW(K) never
    exceeds the reference (E[IW(K)] rises to log p(x)) and IW(max K) falls short of it by no
    more than its delta-method bias Var(w) / (2 K E[w]^2), each within 4 standard errors; with
    ``exact`` (log p(x) in closed form) the reference itself is checked against it.

    :returns: ``{K: (mean, se)}`` of the estimator, and the reference's dict.
    """
    r = reference(model, x, c)
    ref, ref_se = r["ref"].mean().item(), _mean_and_se(r["ref_se"])
    est = {}
    for K in ks:
        runs = torch.stack([iw_log_likelihood(model, x, c=c, num_samples=K, seed=s)
                            .per_datapoint.double().mean() for s in range(seeds)])
        est[K] = (runs.mean().item(), runs.std().item() / math.sqrt(seeds))
    if exact is not None:
        exact = exact.double().mean().item()
        bias = r["rel_var"].mean().item() / (2 * 10_000)
        assert abs(ref + bias - exact) < 4 * ref_se + 1e-6, (ref, exact, ref_se)
    if 1 in est:
        elbo, elbo_se = r["elbo"].mean().item(), _mean_and_se(r["elbo_se"])
        m, se = est[1]
        assert abs(m - elbo) < 4 * math.hypot(se, elbo_se), (m, elbo, se, elbo_se)
    for a, b in zip(ks, ks[1:]):
        assert est[b][0] > est[a][0] - 4 * math.hypot(est[a][1], est[b][1]), est
    for K, (m, se) in est.items():
        assert m < ref + 4 * math.hypot(se, ref_se), (K, m, se, ref, ref_se)
    K = max(ks)
    m, se = est[K]
    bias = r["rel_var"].mean().item() / (2 * K)
    assert m > ref - bias - 4 * math.hypot(se, ref_se), (K, m, se, ref, ref_se, bias)
    return est, r
