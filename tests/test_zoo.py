"""The model zoo (issue 14): full-covariance guides, decoder-output variance, convolutional
networks, the hierarchical VAE, latent-space walks, Frey faces — and one contract table over
every built-in model and option."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from iw_checks import check_iw_rises_to_reference
from torch.distributions import kl_divergence

from pvae import data
from pvae.distributions import as_mvn, kl_mvn_diagonal
from pvae.inference import IWAE, ReparamELBO, elbo_terms, impute, iw_log_likelihood
from pvae.models import CVAE, MODELS, PPCA, VAE, HierarchicalVAE, interpolate, latent_path, traverse
from pvae.models.likelihoods import MIN_DECODER_SCALE, make_likelihood
from pvae.nn import ConvDecoder, ConvEncoder, GaussianEncoder
from pvae.train import Adam, fit

from conftest import rng

X_DIM, IMAGE = 12, (3, 4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: intra-op threads only add overhead (x30 for the conv nets on a busy
    2-core machine), so this module runs single-threaded and restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unit(n=64):
    """Structured intensities in (0, 1): a 2-D latent through a fixed random map."""
    g = rng(1)
    A = 3 * torch.randn(2, X_DIM, generator=g)
    return torch.sigmoid(torch.randn(n, 2, generator=g) @ A)


def binary(n=64):
    return torch.bernoulli(unit(n), generator=rng(2))


def labels(n=64):
    return torch.randint(0, 3, (n,), generator=rng(3))


CONV = dict(network="conv", image_shape=IMAGE, channels=(4, 8))
# (constructor, kwargs, data, conditioning): every built-in model and every zoo option
ZOO = [
    (VAE, dict(latent_dim=2, hidden_dims=(16,)), binary, None),
    (VAE, dict(latent_dim=3, hidden_dims=(16,), guide="full"), binary, None),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), **CONV), binary, None),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), guide="full", **CONV), binary, None),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), likelihood="gaussian",
               likelihood_scale="decoder"), unit, None),
    (VAE, dict(latent_dim=2, hidden_dims=(16,), likelihood="laplace",
               likelihood_scale="decoder", **CONV), unit, None),
    (CVAE, dict(latent_dim=2, num_classes=3, hidden_dims=(16,), guide="full"), binary, labels),
    (CVAE, dict(latent_dim=2, num_classes=3, hidden_dims=(16,), prior="learned", guide="full",
                likelihood="gaussian", likelihood_scale="decoder"), unit, labels),
    (CVAE, dict(latent_dim=2, num_classes=3, hidden_dims=(16,), **CONV), binary, labels),
    (CVAE, dict(latent_dim=2, num_classes=3, hidden_dims=(16,), prior="learned", guide="full",
                **CONV), binary, labels),
    (HierarchicalVAE, dict(latent_dims=(3, 2), hidden_dims=(16, 8)), binary, None),
    (HierarchicalVAE, dict(latent_dims=(3, 2, 2), hidden_dims=(16, 8, 8), num_hidden_layers=1,
                           likelihood="gaussian", likelihood_scale="decoder"), unit, None),
    (PPCA, dict(latent_dim=2, guide="full"), unit, None),
]
IDS = [f"{c.__name__}-{i}" for i, (c, *_) in enumerate(ZOO)]


def test_zoo_covers_every_model():
    assert {cls for cls, *_ in ZOO} == set(MODELS.values())


@pytest.mark.parametrize("cls,kwargs,make_x,make_c", ZOO, ids=IDS)
def test_contract(cls, kwargs, make_x, make_c, tmp_path):
    """A few fit steps with finite, rising ELBO; save -> load -> identical outputs; float64;
    IW log-likelihood finite and >= the ELBO on average, and rising with K to a K = 10^4
    reference; sample and impute shapes."""
    x = make_x(64)
    c = make_c(64) if make_c else None
    model = cls(X_DIM, **kwargs)
    history = fit(model, x, c, num_epochs=6, batch_size=16, optim=Adam(1e-2), progress=False,
                  checkpoint_dir=tmp_path, device="cpu")
    elbos = history.column("train_elbo")
    assert all(math.isfinite(e) for e in elbos)
    assert sum(elbos[-2:]) / 2 > sum(elbos[:2]) / 2

    # save -> load (config through JSON, as config.json keeps it) -> identical outputs
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    clone = cls.from_config(json.loads(json.dumps(model.config)))
    clone.load_state_dict(state["model"])
    assert torch.equal(clone.reconstruct(x[:8], None if c is None else c[:8]),
                       model.reconstruct(x[:8], None if c is None else c[:8]))

    # IW >= ELBO on average, up to 3 standard errors of the paired difference
    x_ev, c_ev = x[:32], None if c is None else c[:32]
    terms = elbo_terms(model, x_ev, c=c_ev, num_samples=50)
    iw = iw_log_likelihood(model, x_ev, c=c_ev, num_samples=50)
    assert torch.isfinite(iw.per_datapoint).all()
    diff = iw.per_datapoint - terms.elbo
    assert diff.mean() > -3 * diff.std() / len(diff) ** 0.5
    # and from above: IW(1) = ELBO, IW(K) rises with K up to a K = 10^4 reference reduced from
    # log_weights here (PPCA: and that reference equals the closed-form log p(x))
    exact = model.log_marginal(x_ev[:4]).detach() if cls is PPCA else None
    check_iw_rises_to_reference(model, x_ev[:4], None if c is None else c_ev[:4], exact=exact)

    # sample and impute shapes
    s = model.sample(5, None if c is None else 1, generator=rng(4))
    assert s.shape == (5, X_DIM) and torch.isfinite(s).all()
    mask = torch.rand(4, X_DIM, generator=rng(5)) < 0.5
    imp = impute(model, x[:4], mask, c=None if c is None else c[:4], num_samples=50,
                 num_draws=3)
    assert imp.mean.shape == (4, X_DIM) and imp.samples.shape == (3, 4, X_DIM)
    assert torch.equal(imp.mean[mask], x[:4][mask]) and torch.isfinite(imp.mean).all()
    assert torch.equal(imp.samples[:, mask], x[:4][mask].expand(3, -1))

    # float64: one code path
    model64 = cls(X_DIM, **kwargs).double()
    fit(model64, x.double(), c, num_epochs=1, batch_size=64, progress=False)
    assert all(p.dtype == torch.float64 for p in model64.parameters())
    iw64 = iw_log_likelihood(model64, x_ev.double(), c=c_ev, num_samples=10)
    assert iw64.per_datapoint.dtype == torch.float64


# -- full-covariance guide -----------------------------------------------------------------------


def test_kl_full_to_diagonal_matches_torch_closed_form():
    L = torch.randn(5, 4, 4, generator=rng(0)).tril(-1) + torch.diag_embed(
        torch.rand(5, 4, generator=rng(1)) + 0.2)
    q = dist.MultivariateNormal(torch.randn(5, 4, generator=rng(2)), scale_tril=L)
    p = dist.Normal(torch.randn(4, generator=rng(3)), torch.rand(4, generator=rng(4)) + 0.5)
    p = p.to_event(1)
    expected = kl_divergence(q, as_mvn(p.expand((5,))))
    assert torch.allclose(kl_mvn_diagonal(q, p), expected, rtol=1e-5)
    assert torch.allclose(kl_divergence(q, p), expected, rtol=1e-5)  # registered with torch


def test_full_encoder_is_lower_triangular_with_positive_diagonal():
    enc = GaussianEncoder(6, (8,), 4, covariance="full")
    loc, L = enc(torch.randn(3, 2, 6, generator=rng(0)))
    assert loc.shape == (3, 2, 4) and L.shape == (3, 2, 4, 4)
    assert torch.equal(L, L.tril()) and (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    rows, cols = torch.tril_indices(4, 4, -1)
    assert (L[..., rows, cols] == 0).all()  # initialized diagonal: it starts as guide="diagonal"
    with torch.no_grad():  # once trained, the strictly lower part follows the network's output
        enc.head.weight.normal_(generator=rng(1))
    x = torch.randn(3, 2, 6, generator=rng(0))
    _, L = enc(x)
    assert torch.equal(L, L.tril()) and (L[..., rows, cols] != 0).all()
    # L = diag(s)(I + A), A = 0.1 x the network's output: row i of the strictly lower part is
    # s_i A_ij
    out = enc.head(enc.act(enc.trunk(x)))
    s = torch.nn.functional.softplus(out[..., 4:8]) + 1e-5
    torch.testing.assert_close(L.diagonal(dim1=-2, dim2=-1), s)
    torch.testing.assert_close(L[..., rows, cols], s[..., rows] * 0.1 * out[..., 8:])
    with pytest.raises(ValueError, match="covariance"):
        GaussianEncoder(6, (8,), 4, covariance="banded")


def test_full_guide_analytic_elbo_is_reconstruction_minus_closed_form_kl():
    """Pyro's TraceMeanField_ELBO finds the closed-form KL of the full guide: its loss equals
    -log p(x | z) at the guide's draw plus KL(q || N(0, I)) in closed form, exactly."""
    model, x = VAE(X_DIM, 3, (16,), guide="full"), binary(8)
    pyro.set_rng_seed(7)
    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model.model, model.guide, x)
    pyro.set_rng_seed(7)
    guide_tr = pyro.poutine.trace(model.guide).get_trace(x)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(model.model, guide_tr)).get_trace(x)
    q = guide_tr.nodes["z"]["fn"]
    assert isinstance(q, dist.MultivariateNormal)
    loc, L = model.encoder(x)
    kl = 0.5 * (L.square().sum((-2, -1)) + loc.square().sum(-1) - 3) - L.diagonal(
        dim1=-2, dim2=-1).log().sum(-1)
    log_px = model_tr.nodes["x"]["fn"].log_prob(x)
    assert torch.allclose(loss, (kl - log_px).sum(), rtol=1e-5)
    assert elbo_terms(model, x, num_samples=2).analytic_kl


def test_full_guide_encode_gives_marginal_scales():
    model, x = VAE(X_DIM, 3, (16,), guide="full"), binary(4)
    loc, scale = model.encode(x)
    _, L = model.encoder(x)
    cov = L @ L.transpose(-1, -2)
    assert torch.allclose(scale, cov.diagonal(dim1=-2, dim2=-1).sqrt())


# -- decoder-output variance ---------------------------------------------------------------------


def test_decoder_scale_is_per_pixel_and_datapoint_with_a_lower_bound():
    lik = make_likelihood("gaussian", 5, "decoder")
    assert lik.param_dim(5) == 10 and not list(lik.parameters())
    out = torch.randn(3, 10, generator=rng(0))
    out[0, 5:] = -1e4  # a decoder pushing the scale to zero stops at the bound
    loc, scale = lik.loc_scale(out)
    assert torch.equal(loc, out[:, :5]) and torch.equal(lik.mean(out), out[:, :5])
    assert torch.allclose(scale[0], torch.full((5,), MIN_DECODER_SCALE))
    assert (scale >= MIN_DECODER_SCALE).all()
    x = torch.randn(3, 5, generator=rng(1))
    expected = torch.distributions.Normal(loc, scale).log_prob(x).sum(-1)
    assert torch.allclose(lik(out).log_prob(x), expected)
    # the density at the data is bounded: at most -log(bound) - log(2 pi)/2 nats per pixel
    assert (lik(out).log_prob(loc) <= 5 * (-math.log(MIN_DECODER_SCALE)
                                            - 0.5 * math.log(2 * math.pi)) + 1e-3).all()
    with pytest.raises(ValueError, match="'decoder'"):
        make_likelihood("gaussian", 5, "per-image")


# -- convolutional networks ----------------------------------------------------------------------


@pytest.mark.parametrize("image_shape", [(28, 28), (28, 20), (5, 7), (3, 4)])
def test_conv_networks_keep_image_sizes_and_leading_dims(image_shape):
    D = image_shape[0] * image_shape[1]
    enc, dec = ConvEncoder(image_shape, (4, 8), 6), ConvDecoder(3, image_shape, (4, 8), 2)
    x = torch.rand(2, 5, D, generator=rng(0))
    h = enc(x)
    assert h.shape == (2, 5, 6)
    assert torch.allclose(h[1, 3], enc(x[1, 3:4])[0], atol=1e-6)  # per datapoint
    assert dec(torch.randn(2, 5, 3, generator=rng(1))).shape == (2, 5, 2 * D)


def test_conv_encoder_appends_extra_inputs_to_the_image_features():
    """A CVAE's guide convolves the image and appends c: the pixels and c both matter, and a
    change of c alone is not read as a change of pixels."""
    enc = ConvEncoder((4, 5), (4,), 6, extra_dim=3)
    x, c = torch.rand(7, 20, generator=rng(0)), torch.eye(3)[torch.arange(7) % 3]
    h = enc(torch.cat([x, c], -1))
    assert h.shape == (7, 6)
    assert not torch.allclose(h, enc(torch.cat([x, c.roll(1, 0)], -1)))
    assert not torch.allclose(h, enc(torch.cat([x.flip(-1), c], -1)))
    # c enters linearly after the convolutions: its effect is the linear layer's last columns
    delta = enc(torch.cat([x, c + 1], -1)) - h
    assert torch.allclose(delta, enc.linear.weight[:, -3:].sum(1).expand(7, 6), atol=1e-6)
    with pytest.raises(ValueError, match="extra_dim"):
        ConvEncoder((4, 5), (4,), 6, extra_dim=-1)
    with pytest.raises(ValueError, match=r"20 pixels .* and 3 extra inputs per row, got rows of 20"):
        enc(x)  # c forgotten


def test_conv_vae_needs_a_matching_image_shape():
    with pytest.raises(ValueError, match="image_shape"):
        VAE(X_DIM, 2, network="conv")
    with pytest.raises(ValueError, match="image_shape"):
        VAE(X_DIM, 2, network="conv", image_shape=(4, 4))
    with pytest.raises(ValueError, match="network"):
        VAE(X_DIM, 2, network="transformer")


# -- hierarchical VAE ----------------------------------------------------------------------------


def test_hierarchical_vae_has_burda_sites_and_architecture():
    model = HierarchicalVAE(784)
    x = torch.zeros(5, 784)
    guide_tr = pyro.poutine.trace(model.guide).get_trace(x)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(model.model, guide_tr)).get_trace(x)
    latent = [n for n, s in model_tr.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and n != "data"]
    assert sorted(latent) == ["z1", "z2"]
    assert model_tr.nodes["z1"]["value"].shape == (5, 100)
    assert model_tr.nodes["z2"]["value"].shape == (5, 50)
    assert [f.name for f in model_tr.nodes["z1"]["cond_indep_stack"]] == ["data"]
    # x -> 100 -> 100 -> z1 -> 50 -> 50 -> z2, tanh (Burda et al. 2015, appendix A)
    widths = [m.out_features for m in model.encoders.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [100, 100, 200, 50, 50, 100]  # (loc, scale) heads: 2 x 100, 2 x 50
    assert any(isinstance(m, torch.nn.Tanh) for m in model.modules())
    with pytest.raises(ValueError, match="two stochastic layers"):
        HierarchicalVAE(784, latent_dims=(10,), hidden_dims=(10,))
    with pytest.raises(ValueError, match="one width per stochastic layer"):
        HierarchicalVAE(784, latent_dims=(10, 5), hidden_dims=(10,))


def test_hierarchical_vae_trains_as_iwae():
    model, x = HierarchicalVAE(X_DIM, (3, 2), (16, 8)), binary(64)
    before = iw_log_likelihood(model, x, num_samples=100, seed=0)
    # the Monte Carlo SE of such a mean, from two seeds on the untrained model
    twice = before.per_datapoint - iw_log_likelihood(model, x, num_samples=100, seed=1).per_datapoint
    mc_se = twice.std().item() / math.sqrt(2 * len(x))
    history = fit(model, x, num_epochs=12, batch_size=32, loss=IWAE(5), optim=Adam(1e-2), progress=False)
    assert all(math.isfinite(e) for e in history.column("train_elbo"))
    # the IWAE bound that it trains on rises, and so does log p(x) (IW, K = 100; measured
    # +0.88 nats in 12 epochs against a Monte Carlo SE of 0.03 per mean)
    values = history.column("train_elbo")
    assert values[-1] > values[0], values
    after = iw_log_likelihood(model, x, num_samples=100, seed=0)
    assert after.mean - before.mean > 4 * math.sqrt(2) * mc_se, (before, after, mc_se)


# -- latent-space walks --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_endpoints_are_the_reconstructions(method):
    model, x = VAE(X_DIM, 3, (16,), guide="full"), binary(4)
    path = interpolate(model, x[0], x[1], num_steps=6, method=method)
    assert path.shape == (6, X_DIM)
    assert torch.allclose(path[0], model.reconstruct(x[:1])[0], atol=1e-6)
    assert torch.allclose(path[-1], model.reconstruct(x[1:2])[0], atol=1e-6)
    batch = interpolate(model, x[:2], x[1:3], num_steps=6, method=method)
    assert batch.shape == (2, 6, X_DIM) and torch.allclose(batch[0], path, atol=1e-6)


def test_spherical_path_keeps_the_norm_profile_of_standard_normal_draws():
    """Pairs of N(0, I_d) draws, d = 100: the mean norm along the spherical path stays at the
    mean norm of the draws themselves (within 4 standard errors at every step), while the
    linear midpoint falls to about sqrt(d / 2)."""
    d, n = 100, 400
    g = rng(0)
    z_a, z_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    reference = torch.cat([z_a, z_b]).norm(dim=-1)
    ref_mean, ref_se = reference.mean(), reference.std() / len(reference) ** 0.5
    slerp = latent_path(z_a, z_b, 9, "spherical").norm(dim=-1)  # (9, n)
    se = (slerp.std(1) ** 2 / n + ref_se ** 2).sqrt()
    assert ((slerp.mean(1) - ref_mean).abs() < 4 * se).all()
    linear_mid = latent_path(z_a, z_b, 9, "linear")[4].norm(dim=-1).mean()
    assert abs(linear_mid - math.sqrt(d / 2)) < 0.05 * math.sqrt(d)
    # parallel codes: the linear path (the limit), no NaN
    same = latent_path(z_a[:2], 2 * z_a[:2], 5, "spherical")
    assert torch.allclose(same, latent_path(z_a[:2], 2 * z_a[:2], 5, "linear"))


def test_traversal_moves_one_dimension_at_a_time():
    model, x = VAE(X_DIM, 3, (16,)), binary(1)[0]
    grid = traverse(model, x, dims=[0, 2], num_steps=5, span=2.0)
    assert grid.shape == (2, 5, X_DIM)
    loc = model.encode(x[None])[0][0]
    z = loc.clone()
    z[2] += 1.0  # offsets -2, -1, 0, 1, 2: step 3 of dimension 2
    assert torch.allclose(grid[1, 3], model.decode(z[None])[0], atol=1e-6)
    assert torch.allclose(grid[0, 2], model.reconstruct(x[None])[0], atol=1e-6)
    with pytest.raises(ValueError, match="dims"):
        traverse(model, x, dims=[3])
    with pytest.raises(ValueError, match="span"):
        traverse(model, x, span=-1.0)
    with pytest.raises(TypeError, match="encode"):
        interpolate(object(), x, x)


# -- Frey faces ----------------------------------------------------------------------------------


def test_frey_faces_from_a_user_supplied_mat(tmp_path):
    from scipy.io import savemat

    ff = np.random.default_rng(0).integers(0, 256, size=(560, 30), dtype=np.uint8)
    savemat(tmp_path / "frey_rawface.mat", {"ff": ff})
    ds = data.load("frey-faces", data_dir=tmp_path)
    assert ds.image_shape == (28, 20) and ds.x_train.shape[1] == 560
    assert len(ds.x_train) + len(ds.x_test) == 30 and len(ds.x_test) == 3
    assert ds.x_train.dtype == torch.float32
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    # each image is one column of ff, scaled to [0, 1]
    columns = {tuple(col): i for i, col in enumerate((ff.T / 255.0).astype(np.float32).round(6))}
    assert tuple(ds.x_test[0].numpy().round(6)) in columns
    # the Gaussian decoder with learned variance trains on it: 10 epochs of 2 steps, the ELBO
    # rising every epoch (measured, seed 0: from -679 to -249 nats per image)
    torch.manual_seed(0)
    model = VAE(560, 2, (32,), likelihood="gaussian", likelihood_scale="decoder",
                network="conv", image_shape=ds.image_shape, channels=(4,))
    elbos = fit(model, ds.x_train, num_epochs=10, batch_size=16, optim=Adam(1e-2),
                progress=False).column("train_elbo")
    assert all(b > a for a, b in zip(elbos, elbos[1:])), elbos
    assert elbos[-1] > elbos[0] + 200, elbos


def test_frey_faces_missing_or_malformed(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="frey_rawface.mat"):
        data.load("frey-faces", data_dir=tmp_path)
    from scipy.io import savemat

    savemat(tmp_path / "frey_rawface.mat", {"faces": np.zeros((560, 3))})
    with pytest.raises(ValueError, match="'ff'"):
        data.load("frey-faces", data_dir=tmp_path)


def test_vae_takes_network_objects():
    encoder = GaussianEncoder(X_DIM, (16,), 2, covariance="full",
                              trunk=ConvEncoder(IMAGE, (4,), 16))
    decoder = ConvDecoder(2, IMAGE, (4,))
    model, x = VAE(X_DIM, 2, network=(encoder, decoder)), binary(32)
    assert model.encoder is encoder and model.decoder is decoder
    start = [p.detach().clone() for p in [*encoder.parameters(), *decoder.parameters()]]
    fit(model, x, num_epochs=2, batch_size=16, progress=False)
    # the objects passed in are the ones trained
    after = [*encoder.parameters(), *decoder.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(start, after))
    assert iw_log_likelihood(model, x, num_samples=10).per_datapoint.isfinite().all()
    with pytest.raises(TypeError, match="pair"):
        VAE(X_DIM, 2, network=(encoder, "decoder"))


# -- command line --------------------------------------------------------------------------------


LATENT_WALKS = ("interpolations", "traversals")


@pytest.mark.parametrize("flags,model_config,figures", [
    (["--network", "conv", "--guide", "full", "--latent-dim", "2", "--hidden-dims", "16"],
     {"network": "conv", "guide": "full", "image_shape": [8, 8]}, LATENT_WALKS),
    (["--model", "cvae", "--condition", "label", "--network", "conv", "--latent-dim", "2",
      "--hidden-dims", "16"], {"network": "conv", "num_classes": 10, "image_shape": [8, 8]},
     ("reconstructions", "style_fixed_class_varied", "class_fixed_style_varied")),
    (["--model", "hvae", "--latent-dims", "4", "2", "--hidden-dims", "16", "8"],
     {"latent_dims": [4, 2], "hidden_dims": [16, 8], "activation": "tanh"}, LATENT_WALKS),
    (["--binarize", "none", "--likelihood", "gaussian", "--likelihood-scale", "decoder",
      "--latent-dim", "2", "--hidden-dims", "16"], {"likelihood_scale": "decoder"}, ()),
])
def test_cli_trains_and_evaluates_zoo_models(tmp_path, flags, model_config, figures):
    from pvae.cli import load_run, main

    out = tmp_path / "run"
    main(["train", "--dataset", "digits", *flags, "--num-epochs", "1", "--num-train", "200",
          "--num-val", "50", "--out", str(out), "--no-progress"])
    config = json.loads((out / "config.json").read_text())
    assert model_config.items() <= config["model_config"].items()
    load_run(out)  # rebuilt from config.json alone
    if figures:
        main(["evaluate", str(out), "--num-samples", "10", "--iw-num-test", "20",
              "--num-test", "20"])
        for name in figures:
            assert (out / "figures" / f"{name}.png").stat().st_size > 1000


def test_cli_refuses_mismatched_zoo_flags(tmp_path, capsys):
    """Each mismatch is a usage error (exit code 2, nothing trained) whose message names it."""
    from pvae.cli import main

    cases = [
        (["--dataset", "synthetic-ppca", "--binarize", "none", "--likelihood", "gaussian",
          "--network", "conv"], "--network conv needs images; synthetic-ppca has no image_shape"),
        (["--dataset", "digits", "--model", "hvae", "--guide", "full"],
         "--guide applies to --model vae, cvae, not --model hvae"),
        # x is the lower half of an image: no convolutions
        (["--dataset", "digits", "--model", "cvae", "--condition", "top-half", "--network",
          "conv"], "--network conv needs whole images as x; with --condition top-half x is part "
                   "of an image: use --network mlp"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["train", *flags, "--out", str(tmp_path / "r")])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"pvae: {message}\n"
        assert not (tmp_path / "r").exists()


class _BottomUp:
    """p(z2) p(z1 | z2) p(x | z1) with the guide q(z1) q(z2 | z1): z2 is drawn given z1, and
    p(z1 | z2) is narrow, so KL(q(z1) || p(z1 | z2)) at that z2 is far from the joint term."""

    def model(self, x):
        with pyro.plate("data", len(x)):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(len(x)), 1.0))
            z1 = pyro.sample("z1", dist.Normal(z2, 0.1))
            pyro.sample("x", dist.Normal(z1, 1.0), obs=x[:, 0])

    def guide(self, x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(len(x)), 1.0))
            pyro.sample("z2", dist.Normal(z1, 0.1))


class _BottomUpFar(_BottomUp):
    """The model of :class:`_BottomUp` with a guide q(z1) q(z2 | z1) = N(1, 0.6^2) N(0.8 z1,
    0.2^2) far from its posterior: the joint q(z1, z2) is a Gaussian whose KL to the model's
    prior p(z1, z2) = N(0, [[1.01, 1], [1, 1]]) is about 4 nats."""

    M, S, A, T = 1.0, 0.6, 0.8, 0.2

    def guide(self, x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(x.new_full((len(x),), self.M), self.S))
            pyro.sample("z2", dist.Normal(self.A * z1, self.T))

    @classmethod
    def joints(cls):
        """q(z1, z2) and p(z1, z2) as 2-D Gaussians, float64."""
        m, s, a, t = cls.M, cls.S, cls.A, cls.T
        q = dist.MultivariateNormal(torch.tensor([m, a * m], dtype=torch.float64), torch.tensor(
            [[s * s, a * s * s], [a * s * s, a * a * s * s + t * t]], dtype=torch.float64))
        p = dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                    torch.tensor([[1.01, 1.0], [1.0, 1.0]], dtype=torch.float64))
        return q, p


def test_elbo_of_a_bottom_up_guide_is_unbiased():
    """A guide that samples the latent sites in another order than the model (the
    HierarchicalVAE's q(z1 | x) q(z2 | z1)): elbo_terms must not use the closed-form KL of
    z1 given a z2 drawn from q(z2 | z1), and its Monte Carlo KL must be the KL of the joints.
    The guide is far from the posterior: KL(q(z1, z2) || p(z1, z2)) ~ 4 nats in closed form,
    and E_q[log p(x | z1)] = -1/2 log(2 pi) - ((x - m)^2 + s^2) / 2. The tolerance is 4
    standard errors of a 4000-draw mean, from the spread of one draw's terms measured here on
    10^5 draws of q made with torch alone."""
    x = torch.linspace(-2, 2, 8)
    num_samples = 4000
    q, p = _BottomUpFar.joints()
    kl = kl_divergence(q, p).item()
    assert 3 < kl < 5
    m, s = _BottomUpFar.M, _BottomUpFar.S
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    recon = -half_log_2pi - ((x.double() - m) ** 2 + s ** 2) / 2
    # one draw's KL term and ELBO term, and their spreads (independent of elbo_terms)
    torch.manual_seed(1)
    z = q.sample((100_000,))
    kl_draws = q.log_prob(z) - p.log_prob(z)
    elbo_draws = dist.Normal(z[:, :1], 1.0).log_prob(x.double()) - kl_draws[:, None]  # (S, 8)
    kl_se = kl_draws.std().item() / math.sqrt(num_samples)
    elbo_se = elbo_draws.std(0) / math.sqrt(num_samples)

    terms = elbo_terms(_BottomUpFar(), x[:, None], num_samples=num_samples)
    assert not terms.analytic_kl
    assert ((terms.kl.double() - kl).abs() < 4 * kl_se).all()
    assert abs(terms.kl.double().mean() - kl) < 4 * kl_se / math.sqrt(len(x))
    assert ((terms.elbo.double() - (recon - kl)).abs() < 4 * elbo_se).all()
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl)
    # the model's order has its own exact ELBO (the guide nearly the prior): ~0.005 nats of KL
    near = elbo_terms(_BottomUp(), x[:, None], num_samples=num_samples)
    exact = -half_log_2pi - (x ** 2 + 1) / 2 - half_log_2pi - 1.01 / 2 + half_log_2pi + 0.5
    # Monte Carlo sd of one term is below 3 nats here: 4 SE of a 4000-draw mean < 0.2
    assert torch.allclose(near.elbo, exact, atol=0.2)


@pytest.mark.parametrize("capturable", [False, True])
def test_training_elbo_of_a_bottom_up_guide_is_unbiased_with_analytic_kl(capturable):
    """``analytic_kl=True`` with a guide out of the model's order: the training objective
    (Pyro's path, and the capturable one) keeps Monte Carlo KLs, so it estimates the exact
    ELBO above; Pyro's TraceMeanField_ELBO would take KL(q(z1) || p(z1 | z2)) at a z2 drawn
    given z1, about 100 nats off per datapoint here (and warn)."""
    x = torch.linspace(-2, 2, 8)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    exact = (-half_log_2pi - (x ** 2 + 1) / 2 - half_log_2pi - 1.01 / 2 + half_log_2pi
             + 0.5).sum()
    estimator = ReparamELBO(4000, analytic_kl=True)
    if capturable:
        estimator.capturable_()
    program = _BottomUp()
    torch.manual_seed(0)
    value, loss = estimator(program.model, program.guide, x[:, None])
    # sd of one datapoint's term < 3 nats: of the sum over 8, averaged over 4000 draws, < 0.14
    assert value.item() == pytest.approx(exact.item(), abs=0.6)
    assert loss.item() == pytest.approx(-value.item())


class _TwoLayerLinear:
    """z2 ~ N(0, 1), z1 | z2 ~ N(a z2, s1^2 I), x | z1 ~ N(W z1 + b, s^2 I): x is Gaussian with
    covariance W (a a^T + s1^2 I) W^T + s^2 I. The guide is deliberately rough (q(z1 | x) from
    a fixed linear map, q(z2 | z1) the prior's conditional): the importance weights correct it."""

    def __init__(self, D=6, q=2, seed=0):
        g = rng(seed)
        self.W, self.b = torch.randn(D, q, generator=g, dtype=torch.float64), torch.randn(
            D, generator=g, dtype=torch.float64)
        self.a, self.s1, self.s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.6, 0.5
        self.A = torch.linalg.pinv(self.W)

    def cov(self):
        S1 = torch.outer(self.a, self.a) + self.s1 ** 2 * torch.eye(2, dtype=torch.float64)
        return self.W @ S1 @ self.W.T + self.s ** 2 * torch.eye(len(self.b), dtype=torch.float64)

    def model(self, x):
        with pyro.plate("data", len(x)):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(len(x)), 1.0))
            z1 = pyro.sample("z1", dist.Normal(z2.unsqueeze(-1) * self.a, self.s1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal((x - self.b) @ self.A.T, 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(z1 @ self.a / (self.a @ self.a + self.s1 ** 2), 1.0))


def test_impute_any_program_matches_the_exact_conditional_gaussian():
    """Two latent sites, a guide in another order than the model: E[x_m | x_o] from impute is
    the Gaussian conditional mean, within 4 Monte Carlo standard errors (sd of E[x_m | z]
    under the posterior, bounded by sqrt(diag Cov(x_m | x_o)), over sqrt(ESS))."""
    program = _TwoLayerLinear()
    C, b = program.cov(), program.b
    x = dist.MultivariateNormal(b, C).sample((30,))
    mask = torch.zeros(30, 6, dtype=torch.bool)
    mask[:, :3] = True
    res = impute(program, torch.where(mask, x, torch.nan), mask, num_samples=20000, seed=0)
    o, m = slice(0, 3), slice(3, 6)
    exact = b[m] + (x[:, o] - b[o]) @ torch.linalg.solve(C[o, o], C[o, m])
    cond_cov = C[m, m] - C[m, o] @ torch.linalg.solve(C[o, o], C[o, m])
    tol = 4 * cond_cov.diagonal().sqrt() / res.ess.sqrt().unsqueeze(-1)
    assert ((res.mean[:, m] - exact).abs() < tol).all()
    ev = dist.MultivariateNormal(b[o], C[o, o]).log_prob(x[:, o])
    K = 20000
    assert ((res.log_evidence - ev).abs() < 4 * torch.sqrt((K / res.ess - 1) / K) + 1e-3).all()
    # the predictive draws have the conditional covariance (30 x 200 draws, centred per row)
    draws = impute(program, x, mask, num_samples=2000, num_draws=200, seed=1).samples[:, :, m]
    centred = (draws - draws.mean(0)).reshape(-1, 3)
    emp = centred.T @ centred / (len(centred) - 30)
    assert torch.allclose(emp.diagonal(), cond_cov.diagonal(), rtol=0.15)
    # one particle: every draw shares its z, and each has its own x ~ p(x | z)
    single = impute(program, x, mask, num_samples=1, num_draws=5, seed=3).samples[:, :, m]
    assert (single[1:] != single[0]).all()
    # the same seed, the same imputation; another seed, another
    again = impute(program, torch.where(mask, x, torch.nan), mask, num_samples=20000, seed=0)
    assert torch.equal(again.mean, res.mean)
    other = impute(program, x, mask, num_samples=20000, seed=2)
    assert not torch.equal(other.mean, res.mean)
