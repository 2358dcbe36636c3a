"""Pyro idioms (issue 26): programs written the way Pyro's examples and tutorials write them,
each checked against a closed form or against Pyro's own ``Trace_ELBO`` / ``TraceEnum_ELBO`` on
the same draws. With an exact-posterior guide every log weight is log p(x_n), so IW and the
ELBO must be the closed form to rounding, and a history of identical rows must be it exactly.

==============================  ===============================================  ==========================
idiom                           test                                             reference
==============================  ===============================================  ==========================
``.mask(m)``, ``pyro.markov``   test_masks_travel_to_the_autoguide               closed form; Trace_ELBO
  (sequences); ``.mask(False)`` test_an_unmasked_guide_of_a_masked_model_is_...  refused, naming the site
                                test_a_latent_site_masked_with_false_counts_...  closed form
``subsample_size``, model or    test_history_units_when_the_program_subsamples   closed form; Trace_ELBO
  guide; pvae batches with      test_units_against_trace_elbo                    Trace_ELBO, same draws
  ``subsample=idx``;            test_history_is_per_datapoint_whoever_subsamples closed form (ELBO, IWAE)
  ``poutine.scale``; unsized    test_every_datapoint_is_scored                   closed form, every point
``@config_enumerate`` (model)   test_enumerated_sites_are_summed_out             exact sum; TraceEnum_ELBO
                                test_autoguide_leaves_enumerated_sites_to_the... closed form
                                test_losses_that_do_not_sum_enumerated_sites_... refused, naming the site
``Delta`` guide (``AutoDelta``) test_a_delta_guide_is_refused                    refused, naming the site
a guide site the model lacks    test_a_guide_site_that_the_model_lacks_is_re...  refused, naming the site
integer (count) data            test_integer_data_give_floating_point_results    closed form (NegBinomial)
index argument beside x         test_the_encoder_reads_x_alone_by_default        renumbering invariance
``DataLoader`` + collate_fn     test_dataloader_batches_with_a_collate_fn        closed form
many particles                  test_elbo_terms_chunks_particles                 chunks seen; closed form
``pyro.deterministic`` in a     test_deterministic_sites_count_in_the_plate_...  closed form, vectorized
  plate of its own
``pyro.factor``, model or guide test_a_factor_counts_in_log_p_or_log_q          closed form; Trace_ELBO
                                test_dreg_refuses_a_factor_in_the_guide          refused, naming the site
global latents                  test_messages_name_the_site_and_say_what_to_do   the messages
==============================  ===============================================  ==========================

Non-broadcasting models (``elbo_terms`` looping over particles) are in ``test_any_program.py``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.poutine.messenger import Messenger
from torch import nn

from pvae.inference import LOSSES, AutoAmortizedNormal, elbo_terms, iw_log_likelihood, log_weights
from pvae.train import Adam, fit


def linear_gaussian_log_marginal(w, x):
    """log N(x; 0, I + w w^T) over the last dim: z ~ N(0, 1), x | z ~ N(w z, I)."""
    cov = torch.eye(len(w), dtype=w.dtype) + torch.outer(w, w)
    return dist.MultivariateNormal(torch.zeros(len(w), dtype=w.dtype), cov).log_prob(x)


# ---------------------------------------------------------------------------------------------
# Masked latent sites: variable-length sequences, as in Pyro's DMM example (per-step sites in
# pyro.markov, masked with .mask(...) beyond each sequence's length)


class Sequences(nn.Module):
    """z_nt ~ N(0, 1), x_nt | z_nt ~ N(w z_nt, I) for t < length_n, both masked beyond it:

        log p(x_n) = sum_{t < length_n} log N(x_nt; 0, I + w w^T).

    ``model(x, lengths)`` with x padded to ``(N, T, D)``; the guide is AutoAmortizedNormal."""

    def __init__(self, w, num_steps):
        super().__init__()
        self.register_buffer("w", w)
        self.num_steps = num_steps
        self.guide = AutoAmortizedNormal(self.model, hidden_dims=())

    def model(self, x, lengths):
        mask = torch.arange(x.size(1), device=x.device) < lengths.unsqueeze(-1)  # (N, T)
        with pyro.plate("sequences", x.size(0)):
            for t in pyro.markov(range(self.num_steps)):
                z = pyro.sample(f"z_{t}", dist.Normal(x.new_zeros(x.size(0)), 1.0)
                                .mask(mask[:, t]))
                pyro.sample(f"x_{t}", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1)
                            .mask(mask[:, t]), obs=x[:, t])

    def exact_guide_(self, *args):
        """Set the guide's linear heads to the exact posterior of every step,
        z_nt | x_nt ~ N(w.x_nt / (1 + |w|^2), 1 / (1 + |w|^2)), the guide built on ``args``."""
        self.guide(*args)  # built on the first call
        precision = 1 + self.w @ self.w
        d = len(self.w)
        with torch.no_grad():
            for t in range(self.num_steps):
                head = self.guide.heads[f"z_{t}"]
                head.weight.zero_()
                head.weight[0, t * d:(t + 1) * d] = self.w / precision
                head.bias[0] = 0.0
                sd = precision ** -0.5 - 1e-4  # softplus(bias) + MIN_SCALE = the posterior sd
                head.bias[1] = torch.log(torch.expm1(sd))

    def log_marginal(self, x, lengths):
        lp = linear_gaussian_log_marginal(self.w, x)  # (N, T)
        mask = torch.arange(x.size(1)) < lengths.unsqueeze(-1)
        return (lp * mask).sum(-1)


def sequence_data(n=30, num_steps=6, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    lengths = torch.randint(1, num_steps + 1, (n,), generator=g)
    x = torch.randn(n, num_steps, 1, generator=g) * w + torch.randn(n, num_steps, d, generator=g)
    x = x * (torch.arange(num_steps) < lengths.unsqueeze(-1)).unsqueeze(-1)  # zero padding
    return w, x, lengths


def test_masks_travel_to_the_autoguide():
    """With the exact posterior in every valid step and the model's masks on the guide's
    sites, every log weight is log p(x_n): IW (any K) and the ELBO are the closed form to
    rounding, and so is Pyro's Trace_ELBO on the same program. Unmasked guide sites would add
    the entropy of every padded step (IW rising with K, ELBO far above log p(x))."""
    w, x, lengths = sequence_data()
    model = Sequences(w, x.size(1))
    model.exact_guide_(x, lengths)
    exact = model.log_marginal(x, lengths)
    iw = iw_log_likelihood(model, x, c=lengths, num_samples=50, seed=0)
    torch.testing.assert_close(iw.per_datapoint, exact, atol=1e-3, rtol=0)
    terms = elbo_terms(model, x, c=lengths, num_samples=4)
    torch.testing.assert_close(terms.elbo, exact, atol=1e-3, rtol=0)
    loss = pyro.infer.Trace_ELBO().loss(model.model, model.guide, x, lengths)
    assert loss == pytest.approx(-exact.sum().item(), abs=1e-2)


# ---------------------------------------------------------------------------------------------
# Integer data


class PoissonGamma:
    """z ~ Gamma(a, b), x_d | z ~ Poisson(z), d = 1..D, counts as int64; the guide is the exact
    posterior Gamma(a + sum x, b + D), so every log weight is the negative-binomial closed form

        log p(x) = lgamma(a + S) - lgamma(a) + a log b - (a + S) log(b + D) - sum lgamma(x_d + 1).
    """

    a, b = 2.0, 0.5

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(torch.full((x.shape[0],), self.a),
                                            torch.full((x.shape[0],), self.b)))
            rate = z.unsqueeze(-1).expand(*z.shape, x.shape[-1])
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(self.a + x.sum(-1), self.b + x.shape[-1]))

    def log_marginal(self, x):
        s, d = x.sum(-1).double(), x.shape[-1]
        a, b = self.a, self.b
        return (torch.lgamma(a + s) - math.lgamma(a) + a * math.log(b) - (a + s) * math.log(b + d)
                - torch.lgamma(x.double() + 1).sum(-1))


def test_integer_data_give_floating_point_results():
    """Counts as int64: every log weight is the closed form (exact guide), so IW is exact to
    rounding; the ELBO (reconstruction by Monte Carlo, KL(Gamma || Gamma) in closed form) is
    unbiased for it. Nothing is truncated to the data's integer dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((50, 4), 3.0), generator=g).long()
    model = PoissonGamma()
    exact = model.log_marginal(x)
    iw = iw_log_likelihood(model, x, num_samples=20, seed=0)
    assert iw.per_datapoint.dtype == torch.get_default_dtype()
    torch.testing.assert_close(iw.per_datapoint.double(), exact, atol=1e-4, rtol=0)
    terms = elbo_terms(model, x, num_samples=100)
    assert terms.elbo.dtype == torch.get_default_dtype()
    diff = terms.elbo.double() - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5, diff.mean()  # 3 SEs
    float64 = iw_log_likelihood(model, x.double(), num_samples=20, seed=0).per_datapoint
    assert float64.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Delta guides


class LinearGaussian(nn.Module):
    """z ~ N(0, 1), x | z ~ N(w z, I) in pyro.plate("data")."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_a_delta_guide_is_refused():
    """A point mass has no density: no importance weight, no KL. Pyro's AutoDelta (MAP) is
    refused by evaluation, naming the site."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = torch.randn(20, 3, generator=g)
    model = LinearGaussian(w)
    model.guide = AutoDelta(model.model)
    with pytest.raises(ValueError, match="'z'.*Delta.*no density"):
        iw_log_likelihood(model, x, num_samples=10)
    with pytest.raises(ValueError, match="'z'.*Delta.*no density"):
        elbo_terms(model, x)



def test_a_guide_site_that_the_model_lacks_is_refused():
    """A latent site in the guide alone (Pyro warns "Found vars in guide but not model") adds
    log q(u) to log q with nothing in log p to match it: the "KL" came out negative and the IW
    estimate off by E[-log q(u)]. Evaluation and pvae's own losses refuse it, naming the site."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    model = LinearGaussian(torch.randn(3, generator=g))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("u", dist.Normal(x.new_zeros(x.shape[0]), 1.0))

    model.guide = guide
    message = "guide's latent site 'u' is not in the model"
    with pytest.raises(ValueError, match=message):
        iw_log_likelihood(model, x, num_samples=10)
    with pytest.raises(ValueError, match=message):
        elbo_terms(model, x)
    for loss in (LOSSES["iwae"](3), LOSSES["vimco"](3)):
        with pytest.raises(ValueError, match=message):
            loss(model.model, guide, x)

# ---------------------------------------------------------------------------------------------
# AutoAmortizedNormal encodes x alone unless told otherwise


class Indexed(nn.Module):
    """The linear-Gaussian model over a data set of ``num_data`` datapoints, mini-batches
    picked by indices passed beside x (``pyro.plate("data", N, subsample=idx)``), and an
    AutoAmortizedNormal guide."""

    def __init__(self, w, num_data):
        super().__init__()
        self.register_buffer("w", w)
        self.num_data = num_data
        self.guide = AutoAmortizedNormal(self.model, hidden_dims=(8,))

    def model(self, x, idx):
        with pyro.plate("data", self.num_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_the_encoder_reads_x_alone_by_default():
    """The indices say which datapoints the batch holds, not what they are: q(z | x) must not
    change when the same rows are numbered otherwise."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = torch.randn(20, 3, generator=g)
    idx = torch.arange(20)
    model = Indexed(w, 2000)
    a = iw_log_likelihood(model, x, c=idx, num_samples=10, seed=0)
    b = iw_log_likelihood(model, x, c=idx + 1000, num_samples=10, seed=0)
    torch.testing.assert_close(a.per_datapoint, b.per_datapoint)
    assert model.guide.encoder[0][0].in_features == 3  # x's width alone


# ---------------------------------------------------------------------------------------------
# Units when the program subsamples itself


class Subsampled(nn.Module):
    """The linear-Gaussian model with the exact posterior as guide, and a data plate that the
    program subsamples itself: ``"model"`` (``subsample_size`` in the model's and the guide's
    plate, Pyro's usual mini-batching) or ``"guide"`` (the guide draws the subsample, the
    model's plate replays it)."""

    def __init__(self, w, subsample_size, where="model"):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.subsample_size, self.where = subsample_size, where

    def model(self, x):
        size = self.subsample_size if self.where == "model" else None
        with pyro.plate("data", x.shape[0], subsample_size=size) as idx:
            batch = x[idx]
            z = pyro.sample("z", dist.Normal(batch.new_zeros(len(idx)), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=batch)

    def guide(self, x):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            pyro.sample("z", dist.Normal(x[idx] @ self.w / precision, precision ** -0.5))


@pytest.mark.parametrize("where", ["model", "guide"])
@pytest.mark.parametrize("batch_size", [120, 60])
def test_history_units_when_the_program_subsamples(where, batch_size):
    """Every row of the data is the same x, so the exact-posterior guide makes every
    datapoint's ELBO log p(x): the history per datapoint is log p(x) to rounding whichever rows
    the program subsamples (full batches of 120, or pvae's mini-batches of 60 subsampled again
    by the program), and equals -Trace_ELBO().loss / (datapoints in the plate)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g)
    x = (torch.randn(1, 3, generator=g) + w).expand(120, 3).contiguous()
    model = Subsampled(w, 16, where)
    exact = linear_gaussian_log_marginal(w, x[:1]).item()
    loss = pyro.infer.Trace_ELBO().loss(model.model, model.guide, x)
    assert -loss / len(x) == pytest.approx(exact, abs=1e-4)
    history = fit(model, x, num_epochs=2, batch_size=batch_size, optim=Adam(1e-8), seed=0, progress=False)
    for value in history.column("train_elbo"):
        assert value == pytest.approx(exact, abs=1e-4), (value, exact)


class SwitchedOff:
    """A latent site switched off with ``.mask(False)`` in model and guide (Pyro's way to drop a
    term), x ~ N(0, 1) observed: every ELBO term is exact, log p(x) with a KL of 0."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).mask(False))
            pyro.sample("x", dist.Normal(torch.zeros_like(x), 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)).mask(False))


def test_a_latent_site_masked_with_false_counts_nothing():
    """Pyro's closed-form KL of a pair masked with False is the float 0.0 (no device to put a
    tensor on): the ELBO terms take it as zeros of the site's shape."""
    x = torch.randn(5, generator=torch.Generator().manual_seed(0))
    exact = dist.Normal(0.0, 1.0).log_prob(x)
    terms = elbo_terms(SwitchedOff(), x, num_samples=3)
    torch.testing.assert_close(terms.elbo, exact)
    assert terms.analytic_kl and terms.kl.abs().max() == 0 and terms.kl_per_dim.tolist() == [0.0]
    torch.testing.assert_close(iw_log_likelihood(SwitchedOff(), x, num_samples=3).per_datapoint,
                               exact)


def test_an_unmasked_guide_of_a_masked_model_is_refused():
    w, x, lengths = sequence_data(n=8)
    model = Sequences(w, x.size(1))

    def unmasked(x, lengths):
        with pyro.plate("sequences", x.size(0)):
            for t in pyro.markov(range(x.size(1))):
                pyro.sample(f"z_{t}", dist.Normal(x.new_zeros(x.size(0)), 1.0))

    program = type("Unmasked", (), {"model": model.model, "guide": staticmethod(unmasked)})()
    with pytest.raises(ValueError, match=r"masks its latent site 'z_\d'.*unmasked.*model's mask"):
        iw_log_likelihood(program, x, c=lengths, num_samples=5)


# ---------------------------------------------------------------------------------------------
# One unit rule: the datapoints the estimate stands for, whoever subsamples


class Scaled(nn.Module):
    """The linear-Gaussian model with the exact posterior as guide, its data plate made in one
    of the ways a Pyro program subsamples or scales its data term:

    - ``"indices"``: pvae's batches, ``pyro.plate("data", N, subsample=idx)``, idx an argument;
    - ``"subsample_size"`` / ``"guide"``: the program draws m of its batch (see
      :class:`Subsampled`);
    - ``"scale"``: ``poutine.scale(scale=N / n)`` around a plate of n, as in Pyro's mini-batch
      examples;
    - ``"unsized"``: ``pyro.plate("data")``, its size inferred from the sites, as in Pyro's
      CVAE and semi-supervised VAE examples.
    """

    def __init__(self, w, kind, num_data=120, subsample_size=16):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.kind, self.num_data, self.subsample_size = kind, num_data, subsample_size

    def _plate(self, x, idx, guide):
        if self.kind == "indices":
            return pyro.plate("data", self.num_data, subsample=idx)
        if self.kind == "unsized":
            return pyro.plate("data")
        if self.kind == "subsample_size" or (self.kind == "guide" and guide):
            return pyro.plate("data", x.shape[0], subsample_size=self.subsample_size)
        return pyro.plate("data", x.shape[0])

    def _rows(self, x, plate):
        return x[plate.indices] if self.kind in ("subsample_size", "guide") else x

    def _scale(self, x):
        return pyro.poutine.scale(scale=self.num_data / x.shape[0] if self.kind == "scale"
                                  else 1.0)

    def model(self, x, idx=None):
        plate = self._plate(x, idx, guide=False)
        with self._scale(x), plate:
            batch = self._rows(x, plate)
            z = pyro.sample("z", dist.Normal(batch.new_zeros(batch.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=batch)

    def guide(self, x, idx=None):
        precision = 1 + self.w @ self.w
        plate = self._plate(x, idx, guide=True)
        with self._scale(x), plate:
            batch = self._rows(x, plate)
            pyro.sample("z", dist.Normal(batch @ self.w / precision, precision ** -0.5))


KINDS = ["indices", "subsample_size", "guide", "scale", "unsized"]


def scaled_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, generator=g)
    return w, torch.randn(n, 1, generator=g) * w + torch.randn(n, 3, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_units_against_trace_elbo(kind):
    """Pyro's Trace_ELBO().loss on a batch, divided by the datapoints it stands for
    (:class:`pvae.inference.handlers.data_units`, read off the same run), is the mean ELBO per
    datapoint: with the exact posterior as guide, the mean closed-form log p(x_n) over the
    datapoints the program scored (their rows read off the observed site)."""
    from pvae.inference.handlers import data_units

    w, x = scaled_data()
    model = Scaled(w, kind)
    idx = torch.arange(40, 80)
    args = (x[idx], idx) if kind in ("indices", "scale") else (x,)
    with data_units(batch_size=args[0].shape[0]) as units:
        loss = pyro.infer.Trace_ELBO().loss(model.model, model.guide, *args)
    scored = units.observed["x"]["value"]
    expected_n = {"indices": 40, "subsample_size": 16, "guide": 16, "scale": 40, "unsized": 120}
    assert units.num_data == expected_n[kind] == len(scored)
    exact = linear_gaussian_log_marginal(w, scored).mean().item()
    assert -loss / units.units == pytest.approx(exact, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("estimator", ["reparam", "iwae"])
def test_history_is_per_datapoint_whoever_subsamples(kind, estimator):
    """fit's history with the exact-posterior guide, identical rows (log p(x_n) the same for
    every n, whichever the program scores): every epoch's value is that log p(x)."""
    w, _ = scaled_data()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 3, generator=g) + w).expand(120, 3).contiguous()
    model = Scaled(w, kind)
    data = (x, torch.arange(120)) if kind == "indices" else (x,)
    history = fit(model, *data, num_epochs=2, batch_size=40, optim=Adam(1e-8), seed=0, progress=False,
                  loss=LOSSES[estimator](num_particles=2 if estimator == "iwae" else 1))
    exact = linear_gaussian_log_marginal(w, x[:1]).item()
    for value in history.column("train_elbo"):
        assert value == pytest.approx(exact, abs=1e-4), (value, exact)


# ---------------------------------------------------------------------------------------------
# Evaluation scores every datapoint, however the program makes its data plate


@pytest.mark.parametrize("kind", ["subsample_size", "guide", "unsized"])
@pytest.mark.parametrize("batch_size", [None, 40, 10])
def test_every_datapoint_is_scored(kind, batch_size):
    """With the exact posterior as guide every log weight is log p(x_n): IW and the ELBO are
    the closed form for every datapoint, in order, whether the plate is unsized or draws 16 of
    the pass's rows itself (covered by subsamples [0, 16), [16, 32), ..., the last one ending
    at the pass's end; a pass of 10 rows is too small for it: it gets the whole data)."""
    w, x = scaled_data(n=60)
    model = Scaled(w, kind)
    exact = linear_gaussian_log_marginal(w, x)
    iw = iw_log_likelihood(model, x, num_samples=8, seed=0, batch_size=batch_size)
    torch.testing.assert_close(iw.per_datapoint, exact, atol=1e-4, rtol=0)
    terms = elbo_terms(model, x, num_samples=3, batch_size=batch_size)
    diff = terms.elbo - exact  # closed-form KL, Monte Carlo reconstruction: unbiased
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5
    assert log_weights(model, x, num_samples=4).shape == (4, 60)


# ---------------------------------------------------------------------------------------------
# Enumerated discrete latents, as TraceEnum_ELBO sums them out


class MixtureVAE(nn.Module):
    """A Gaussian-mixture prior in a linear VAE, its component enumerated in the model
    (``@config_enumerate``, as in Pyro's GMM tutorial), the guide proposing z alone:

        k ~ Categorical(pi), z | k ~ N(mu_k, 1), x | z ~ N(w z, I),
        log p(x) = log sum_k pi_k N(x; mu_k w, I + w w^T).

    The guide is N(w.x / (1 + |w|^2), 1 / (1 + |w|^2)) (the posterior under mu = 0)."""

    def __init__(self, w, pi=(0.3, 0.7), mu=(-2.0, 2.0)):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("pi", torch.tensor(pi))
        self.register_buffer("mu", torch.tensor(mu))

    @config_enumerate
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(self.pi))
            z = pyro.sample("z", dist.Normal(self.mu[k], 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.w / precision, precision ** -0.5))

    def log_marginal(self, x):
        cov = torch.eye(len(self.w)) + torch.outer(self.w, self.w)
        parts = [self.pi[k].log() + dist.MultivariateNormal(self.mu[k] * self.w, cov).log_prob(x)
                 for k in range(2)]
        return torch.logsumexp(torch.stack(parts), 0)

    def log_weight(self, x, z):
        """log sum_k pi_k N(z; mu_k, 1) N(x; w z, I) - log q(z | x), the exact sum."""
        prior = torch.logsumexp(self.pi.log()[:, None] + dist.Normal(self.mu[:, None], 1.0)
                                .log_prob(z), 0)
        likelihood = dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1).log_prob(x)
        precision = 1 + self.w @ self.w
        guide = dist.Normal(x @ self.w / precision, precision ** -0.5).log_prob(z)
        return prior + likelihood - guide


class AutoMixture(MixtureVAE):
    """The mixture model with an AutoAmortizedNormal guide (a linear one)."""

    def __init__(self, w):
        super().__init__(w)
        self.auto = AutoAmortizedNormal(self.model, hidden_dims=())

    def guide(self, x):
        return self.auto(x)


def mixture_data(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(model.pi, n, replacement=True, generator=g)
    z = model.mu[k] + torch.randn(n, generator=g)
    return z.unsqueeze(-1) * model.w + torch.randn(n, len(model.w), generator=g)


def test_enumerated_sites_are_summed_out():
    """One particle: the log weight is the exact sum over the component at the guide's draw
    (the same draw, replayed); its sum over the datapoints is minus TraceEnum_ELBO's loss on
    the same draw; with many particles IW reaches the closed-form log p(x)."""
    w, _ = scaled_data()
    model = MixtureVAE(w)
    x = mixture_data(model, 100, seed=1)
    one = iw_log_likelihood(model, x, num_samples=1, seed=3).per_datapoint
    torch.manual_seed(3)  # the draw of pass 0 (seed + 0), again
    z = pyro.poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]
    torch.testing.assert_close(one, model.log_weight(x, z), atol=1e-4, rtol=0)
    pyro.set_rng_seed(3)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x)
    assert -loss == pytest.approx(one.sum().item(), abs=1e-3)
    terms = elbo_terms(model, x, num_samples=1)
    assert not terms.analytic_kl and terms.kl_per_dim is None
    iw = iw_log_likelihood(model, x, num_samples=2000, seed=0)
    diff = iw.per_datapoint - model.log_marginal(x)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()


def test_autoguide_leaves_enumerated_sites_to_the_model():
    """AutoAmortizedNormal on the mixture model amortizes z and leaves k to the model, which
    TraceEnum_ELBO trains and evaluation sums out; the fitted guide's IW estimate reaches the
    closed form."""
    w, _ = scaled_data()
    model = AutoMixture(w)
    x, x_test = mixture_data(model, 300, seed=1), mixture_data(model, 100, seed=2)
    fit(model, x, loss=TraceEnum_ELBO(max_plate_nesting=1), num_epochs=30, batch_size=50, optim=Adam(0.05),
        seed=0, progress=False)
    guide_sites = pyro.poutine.trace(model.guide).get_trace(x_test).nodes
    assert "z" in guide_sites and "k" not in guide_sites
    iw = iw_log_likelihood(model, x_test, num_samples=500, seed=0)
    diff = iw.per_datapoint - model.log_marginal(x_test)
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3, diff.mean()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_that_do_not_sum_enumerated_sites_out_refuse_them(name):
    """pvae's own losses do not enumerate: on the mixture model they would draw the component
    from its prior, a biased bound with no error (IWAE with K = 1000 on a Bernoulli mixture gave
    -6.29 nats for an exact -4.43). The first step refuses, naming the site, the loss and
    TraceEnum_ELBO (which the test above trains with); the refusal costs no extra run of the
    programs (the step's own sites are noted)."""
    w, _ = scaled_data()
    model = MixtureVAE(w)
    x = mixture_data(model, 20, seed=1)
    loss = LOSSES[name](2) if name in ("iwae", "vimco") else LOSSES[name]()
    pattern = (rf"enumerates the discrete site 'k' .* {type(loss).__name__} does not sum "
               r"enumerated sites out .* loss=pyro.infer.TraceEnum_ELBO")
    with pytest.raises(ValueError, match=pattern):
        fit(model, x, loss=loss, num_epochs=1, progress=False)


class Recorded(nn.Module):
    """The linear-Gaussian model with the exact posterior as guide, recording a quantity with
    ``pyro.deterministic`` in a plate of its own at dim=-2 (as Pyro's examples record
    per-feature values): the particle plate must clear that plate too."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def model(self, x):
        with pyro.plate("features", len(self.w), dim=-2):
            pyro.deterministic("loading", self.w.unsqueeze(-1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.w / precision, precision ** -0.5))


def test_deterministic_sites_count_in_the_plate_nesting(recwarn):
    """A deterministic site's plate at dim=-2 counts in the nesting: the particles are
    vectorized left of it (no fallback to one particle at a time, no warning), every log weight
    is the closed form, and the inference gap's refined guide trains beside it (Pyro's
    ``Trace_ELBO`` with that nesting): its log-likelihood is the closed form within its Monte
    Carlo error, its refined ELBO a bound just below it."""
    from pvae.inference import inference_gap

    w, x = scaled_data(n=30)
    model = Recorded(w)
    r = iw_log_likelihood(model, x, num_samples=10, seed=0)
    torch.testing.assert_close(r.per_datapoint, linear_gaussian_log_marginal(w, x), atol=1e-4,
                               rtol=0)
    assert not [m for m in recwarn if "vectorized particles" in str(m.message)]
    gap = inference_gap(model, x[:5], num_samples=200, num_steps=20, seed=0)
    exact = linear_gaussian_log_marginal(w, x[:5])
    assert ((gap.log_likelihood - exact).abs() <= 4 * gap.log_likelihood_mcse).all()
    # a bound: below log p(x) but for Monte Carlo error, and close (q* starts at the posterior)
    below = exact - gap.elbo_refined
    assert (below >= -4 * gap.elbo_refined_mcse).all() and (below < 0.1).all(), below


# ---------------------------------------------------------------------------------------------
# A pyro.factor in the model or the guide: a term of log p(x, z) or of log q, as Pyro's ELBOs
# count it


class Factored(Scaled):
    """The linear-Gaussian model of :class:`Scaled` with its exact-posterior guide, and
    ``pyro.factor("tilt", c_n)`` beside z in the data plate of the model or of the guide (with
    ``has_rsample=True``, as Pyro asks of a guide's factor), c_n = -0.1 |x_n|^2: Pyro's
    ``Trace_ELBO`` adds every sample site of the model trace and subtracts every one of the
    guide trace, so every log weight is log p(x_n) + c_n, or log p(x_n) - c_n."""

    def __init__(self, w, where):
        super().__init__(w, "full")
        self.where = where

    def tilt(self, x):
        return -0.1 * (x ** 2).sum(-1)

    def model(self, x, idx=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)
            if self.where == "model":
                pyro.factor("tilt", self.tilt(x))

    def guide(self, x, idx=None):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.w / precision, precision ** -0.5))
            if self.where == "guide":
                pyro.factor("tilt", self.tilt(x), has_rsample=True)


@pytest.mark.parametrize("where", ["model", "guide"])
@pytest.mark.parametrize("estimate", ["iw", "elbo_terms", "reparam", "captured", "iwae",
                                      "vimco", "score"])
def test_a_factor_counts_in_log_p_or_log_q(where, estimate):
    """Every estimate is log p(x_n) + c_n (a factor in the model) or log p(x_n) - c_n (in the
    guide), the closed form, on every draw, as Pyro's Trace_ELBO gives it on the same program
    (checked first). Before, IW, ``elbo_terms``, IWAE and VIMCO left a factor out wherever it
    was, and so did the captured ELBO: |c_n| nats per datapoint off, with no error."""
    w, x = scaled_data(n=30)
    model = Factored(w, where)
    exact = linear_gaussian_log_marginal(w, x) + (1 if where == "model" else -1) * model.tilt(x)
    pyro.set_rng_seed(0)
    loss = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert -loss.loss(model.model, model.guide, x) == pytest.approx(exact.sum().item(), abs=1e-3)
    if estimate == "iw":
        per_datapoint = iw_log_likelihood(model, x, num_samples=8, seed=0).per_datapoint
    elif estimate == "elbo_terms":
        terms = elbo_terms(model, x, num_samples=20)
        torch.testing.assert_close(terms.reconstruction - terms.kl, terms.elbo)
        if where == "model":  # closed-form KL, Monte Carlo reconstruction: unbiased
            diff = terms.elbo - exact
            assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5, diff
            # (the test's power: leaving the factor out moves the mean by 10 standard errors)
            assert abs(model.tilt(x).mean()) > 10 * diff.std() / len(diff) ** 0.5
            return
        per_datapoint = terms.elbo  # a Monte Carlo KL (log q is no closed form): exact
    else:
        make = LOSSES["reparam" if estimate == "captured" else estimate]
        objective = make(num_particles=1 if estimate in ("reparam", "captured", "score") else 4)
        if estimate == "captured":
            objective.capturable_()
        value, _ = objective(model.model, model.guide, x)
        per_datapoint, exact = value.reshape(1), exact.sum().reshape(1)
    torch.testing.assert_close(per_datapoint, exact, atol=1e-3, rtol=0)


def test_dreg_refuses_a_factor_in_the_guide():
    """DReG's stop-gradient is defined for densities of z; a guide's factor is refused by name."""
    w, x = scaled_data(n=10)
    model = Factored(w, "guide")
    with pytest.raises(ValueError, match="gradient='dreg'.*'tilt'.*pyro.factor"):
        LOSSES["iwae"](num_particles=2, gradient="dreg")(model.model, model.guide, x)


class ProposedComponent(MixtureVAE):
    """The mixture model, still ``@config_enumerate``, with a guide that samples the component
    itself (a Categorical beside z): nothing is left to enumerate, so nothing is refused."""

    def guide(self, x):
        precision = 1 + self.w @ self.w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Categorical(self.pi))
            pyro.sample("z", dist.Normal(x @ self.w / precision, precision ** -0.5))


def test_a_marked_site_that_the_guide_samples_is_not_refused():
    """The refusal above is about sites left to enumeration: where the guide samples the marked
    site, the score-function ELBO trains the model as Pyro's TraceGraph_ELBO would, and its
    first value is a finite ELBO per datapoint."""
    from pvae.inference import ScoreFunctionELBO, SVIObjective

    w, _ = scaled_data()
    model = ProposedComponent(w)
    x = mixture_data(model, 20, seed=1)
    pyro.set_rng_seed(0)
    value, loss = SVIObjective(model, ScoreFunctionELBO())(x)
    assert torch.isfinite(value) and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# Batches from the user's own DataLoader


class PackedSequences(Sequences):
    """The masked sequence model taking what a ``collate_fn`` for variable-length sequences
    returns, ``model(padded, packed, mask)``: padded ``(B, T, D)``, a ``PackedSequence`` of the
    same sequences (one row per step: not aligned with the batch) and the ``(B, T)`` mask. The
    encoder reads the padded tensor alone."""

    def model(self, padded, packed, mask):
        if not isinstance(packed, nn.utils.rnn.PackedSequence):
            raise TypeError(f"expected a PackedSequence, got {type(packed).__name__}")
        return super().model(padded, mask.sum(-1))


def pad_collate(num_steps):
    def collate(items):
        lengths = torch.tensor([len(s) for s in items])
        padded = torch.zeros(len(items), num_steps, items[0].shape[-1])
        for i, s in enumerate(items):
            padded[i, :len(s)] = s
        packed = nn.utils.rnn.pack_sequence(items, enforce_sorted=False)
        return padded, packed, torch.arange(num_steps) < lengths.unsqueeze(-1)
    return collate


def test_dataloader_batches_with_a_collate_fn():
    """Sequences of different lengths, batched by the user's DataLoader and collate_fn into
    (padded, PackedSequence, mask), the arguments Pyro's SVI.step(*args) would get: fit and
    evaluation take the loader, count datapoints from the data plate (the sequences, not the
    PackedSequence's rows), and with the exact guide give the closed form."""
    from torch.utils.data import DataLoader

    w, x, lengths = sequence_data(n=40)
    items = [x[i, :lengths[i]] for i in range(len(x))]
    loader = DataLoader(items, batch_size=16, collate_fn=pad_collate(x.size(1)))
    model = PackedSequences(w, x.size(1))
    model.exact_guide_(*pad_collate(x.size(1))(items[:16]))
    exact = model.log_marginal(x, lengths)
    iw = iw_log_likelihood(model, loader, num_samples=10, seed=0)
    torch.testing.assert_close(iw.per_datapoint, exact, atol=1e-3, rtol=0)
    terms = elbo_terms(model, loader, num_samples=2)
    torch.testing.assert_close(terms.elbo, exact, atol=1e-3, rtol=0)
    history = fit(model, loader, num_epochs=1, optim=Adam(1e-8), seed=0, progress=False)
    assert history.column("train_elbo")[0] == pytest.approx(exact.mean().item(), abs=1e-3)
    with pytest.raises(ValueError, match="DataLoader.*c=None"):
        iw_log_likelihood(model, loader, c=lengths, num_samples=2)


# ---------------------------------------------------------------------------------------------
# Particles: looped where the program does not broadcast, chunked whatever their number


def test_elbo_terms_chunks_particles():
    """elbo_terms with many particles traces chunk_size of them at a time (memory bounded by
    the chunk, not by num_samples), and its estimate is the same ELBO."""
    w, x = scaled_data(n=30)
    model = Scaled(w, "unsized")
    shapes = []

    class Record(Messenger):
        def _pyro_post_sample(self, msg):
            if msg["name"] == "z":
                shapes.append(tuple(msg["value"].shape))

    model.guide = Record()(model.guide)
    terms = elbo_terms(model, x, num_samples=1000, chunk_size=100)
    assert max(shape[0] for shape in shapes if len(shape) == 2) == 100
    exact = linear_gaussian_log_marginal(w, x)
    diff = terms.elbo - exact
    assert abs(diff.mean()) < 3 * diff.std() / len(diff) ** 0.5 + 1e-3


# ---------------------------------------------------------------------------------------------
# Messages that name the site and the idiom


class GlobalShift(nn.Module):
    """z_n ~ N(0, 1), u ~ N(0, 1) shared by every datapoint, x_n | z_n, u ~ N(w z_n + u, I)."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)
        self.guide = AutoAmortizedNormal(self.model, hidden_dims=())

    def model(self, x):
        u = pyro.sample("u", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w + u, 1.0).to_event(1), obs=x)


def test_messages_name_the_site_and_say_what_to_do():
    w, x = scaled_data(n=20)
    model = GlobalShift(w)
    # a global latent beside AutoAmortizedNormal (AutoNormal's auxiliary draw for it): the
    # model's site is named, not a joint autoguide
    with pytest.raises(ValueError, match=r"latent site 'u' is outside pyro.plate\('data', "
                                         r"\.\.\.\).*global.*poutine.condition"):
        iw_log_likelihood(model, x, num_samples=5)
    # conditioned on a value, u is an observed site outside every plate: named, with the way
    # out; with observed=("x",) and a guide without u, log p(x | u) = log N(x; u, I + w w^T)
    u = torch.tensor(0.7)
    conditioned = pyro.poutine.condition(model.model, data={"u": u})
    given = type("Given", (), {"model": staticmethod(conditioned),
                               "guide": AutoAmortizedNormal(conditioned, hidden_dims=())})()
    with pytest.raises(ValueError, match=r"observed site \['u'\] lies in no plate.*"
                                         r"observed=\['x'\]"):
        iw_log_likelihood(given, x, num_samples=5)
    given.guide(x)  # built on the first call; then set to the exact posterior of z given u:
    precision = 1 + w @ w  # N(w.(x - u) / (1 + |w|^2), 1 / (1 + |w|^2)), so every weight is
    head = given.guide.heads["z"]  # log p(x_n | u) and IW is the closed form to rounding
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0] = w / precision
        head.bias[0] = -u * w.sum() / precision
        head.bias[1] = torch.log(torch.expm1(precision ** -0.5 - 1e-4))  # softplus + MIN_SCALE
    iw = iw_log_likelihood(given, x, num_samples=5, observed=("x",))
    torch.testing.assert_close(iw.per_datapoint, linear_gaussian_log_marginal(w, x - u),
                               atol=1e-4, rtol=0)

    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(x.new_full((len(x),), 0.5)))
            pyro.sample("x", dist.Normal(k.unsqueeze(-1), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="'k' is discrete.*enumerate it in the model"):
        AutoAmortizedNormal(discrete)(x)
    sequential = type("Sequential", (), {
        "model": staticmethod(pyro.infer.config_enumerate(discrete, default="sequential")),
        "guide": staticmethod(lambda x: None)})()
    with pytest.raises(ValueError, match="'k' is marked.*'sequential'.*mark it 'parallel'"):
        iw_log_likelihood(sequential, x, num_samples=2)
