"""One contract table over every built-in model: a new model is tested by adding a line."""

import json

import pyro
import pytest
import torch
from iw_checks import check_iw_rises_to_reference

from pvae.inference import elbo_terms, iw_log_likelihood
from pvae.models import PPCA, VAE
from pvae.train import Adam, fit

from conftest import rng

X_DIM = 12


def unit(n=64):
    """Structured intensities in (0, 1): a 2-D latent pushed through a fixed random map."""
    g = rng(1)
    A = 3 * torch.randn(2, X_DIM, generator=g)
    return torch.sigmoid(torch.randn(n, 2, generator=g) @ A)


def binary(n=64):
    return torch.bernoulli(unit(n), generator=rng(2))


# (constructor, kwargs, data)
CONTRACT = [
    (VAE, dict(latent_dim=2, hidden_dims=(16,)), binary),
    (VAE, dict(latent_dim=3, hidden_dims=(16, 8), activation="tanh"), binary),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), likelihood="continuous-bernoulli"), unit),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), likelihood="gaussian"), unit),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), likelihood="gaussian", likelihood_scale=0.1), unit),
    (VAE, dict(latent_dim=2, hidden_dims=(), likelihood="laplace"), unit),
    (PPCA, dict(latent_dim=2, guide="full"), unit),
    (PPCA, dict(latent_dim=3, guide="diagonal"), unit),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CONTRACT)]


@pytest.mark.parametrize("cls,kwargs,make_x", CONTRACT, ids=IDS)
def test_trains_with_falling_loss(cls, kwargs, make_x):
    model = cls(X_DIM, **kwargs)
    x = make_x(256)
    history = fit(model, x, num_epochs=30, batch_size=64, optim=Adam(1e-2), progress=False, device="cpu")
    elbos = history.column("train_elbo")
    assert all(torch.isfinite(torch.tensor(elbos)))
    assert sum(elbos[-5:]) / 5 > sum(elbos[:5]) / 5 + 0.5


@pytest.mark.parametrize("cls,kwargs,make_x", CONTRACT, ids=IDS)
def test_sites_plate_and_shapes(cls, kwargs, make_x):
    model, x = cls(X_DIM, **kwargs), make_x(5)
    guide_tr = pyro.poutine.trace(model.guide).get_trace(x)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(model.model, guide_tr)).get_trace(x)
    assert model_tr.nodes["x"]["is_observed"]
    assert model_tr.nodes["z"]["value"].shape == (5, kwargs["latent_dim"])
    assert [f.name for f in model_tr.nodes["z"]["cond_indep_stack"]] == ["data"]
    loc, scale = model.encode(x)
    assert loc.shape == scale.shape == (5, kwargs["latent_dim"]) and (scale > 0).all()
    assert model.reconstruct(x).shape == (5, X_DIM)
    assert model.sample(7).shape == (7, X_DIM)


@pytest.mark.parametrize("cls,kwargs,make_x", CONTRACT, ids=IDS)
def test_state_dict_roundtrip(cls, kwargs, make_x, tmp_path):
    model, x = cls(X_DIM, **kwargs), make_x(16)
    fit(model, x, num_epochs=2, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    config = json.loads(json.dumps(model.config))  # as a run folder's config.json keeps it
    assert config["x_dim"] == X_DIM and config["latent_dim"] == kwargs["latent_dim"]
    clone = cls.from_config(config)
    clone.load_state_dict(state["model"])
    assert torch.equal(clone.reconstruct(x), model.reconstruct(x))
    with pytest.raises(ValueError, match="does not take"):
        cls.from_config({**config, "no_such_argument": 1})


@pytest.mark.parametrize("cls,kwargs,make_x", CONTRACT, ids=IDS)
def test_float64(cls, kwargs, make_x):
    model, x = cls(X_DIM, **kwargs).double(), make_x(32)
    history = fit(model, x, num_epochs=2, batch_size=16, progress=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert len(history) == 2
    iw = iw_log_likelihood(model, x.double(), num_samples=10)
    assert iw.per_datapoint.dtype == torch.float64


@pytest.mark.parametrize("cls,kwargs,make_x", CONTRACT, ids=IDS)
def test_iw_evaluation(cls, kwargs, make_x):
    model, x = cls(X_DIM, **kwargs), make_x(40)
    fit(model, x, num_epochs=3, batch_size=20, progress=False)
    terms = elbo_terms(model, x, num_samples=200)
    iw = iw_log_likelihood(model, x, num_samples=200)
    # IW with K=200 >= ELBO per datapoint up to Monte Carlo error
    diff = iw.per_datapoint - terms.elbo
    assert diff.mean() > -3 * diff.std() / len(diff) ** 0.5
    # and from above: IW(1) = ELBO, IW(K) rises with K up to a K = 10^4 reference reduced from
    # log_weights in the test (PPCA: and that reference equals the closed-form log p(x))
    exact = model.log_marginal(x[:4]).detach() if isinstance(model, PPCA) else None
    check_iw_rises_to_reference(model, x[:4], exact=exact)


def test_bad_inputs_are_clear():
    model = VAE(X_DIM, 2, (8,))
    with pytest.raises(ValueError, match=r"shape \(batch, 12\)"):
        model.model(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="binarize"):
        model.model(torch.full((3, X_DIM), 0.5))
    with pytest.raises(ValueError, match="CVAE"):
        model.model(binary(3), torch.zeros(3))
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(X_DIM, 0)


def test_two_models_do_not_share_parameters():
    a, b = VAE(X_DIM, 2, (8,)), VAE(X_DIM, 2, (8,))
    x = binary(64)
    before = [p.detach().clone() for p in b.parameters()]
    fit(a, x, num_epochs=2, batch_size=16, progress=False)
    # b is also usable by Pyro's own SVI afterwards, and fit(a) never touched it
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))
    svi = pyro.infer.SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    svi.step(x)
    assert not all(torch.equal(p, q) for p, q in zip(before, b.parameters()))
