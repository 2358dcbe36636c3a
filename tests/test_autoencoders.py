"""Deterministic autoencoders: the linear AE against PCA, each penalty against a closed form,
corruptions against their distributions, the masked AE's masking, the engine (fit, resume) and
the command line."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA
from torch import nn

from pvae import data
from pvae.autoencoders import (
    Autoencoder,
    AutoencoderLoss,
    DeepAutoencoder,
    LinearAutoencoder,
    MaskedAutoencoder,
    code_statistics,
    encode_all,
    gaussian_noise,
    jacobian_penalty,
    kl_sparsity,
    l1_sparsity,
    linear_probe,
    mask_noise,
    reconstruction_error,
    sigmoid_jacobian_penalty,
)
from pvae.cli import main
from pvae.models import VAE
from pvae.train import Adam, ExponentialLR, fit


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_linear_autoencoder_is_pca_on_digits(digits):
    """Baldi & Hornik (1989): the linear AE's optimum projects onto the top principal subspace.
    Trained by fit (Adam, decaying learning rate) from a random orthogonal start, its decoder
    columns span scikit-learn's top-4 principal subspace to within 1° (code 4: the eigengap
    0.40 -> 0.27 makes the subspace well determined) and its training MSE is within 0.5% of
    PCA's (and never below it, up to float32 rounding: PCA is the optimum)."""
    x = digits.x_train
    ae = LinearAutoencoder(x.shape[1], 4)
    fit(ae, x, num_epochs=100, batch_size=64, optim=Adam(0.05, schedule=ExponentialLR(0.96)),
        progress=False)  # fit(ae, x): the autoencoder's own default loss
    pca = PCA(4).fit(x.double().numpy())
    angles = np.degrees(subspace_angles(ae.decoder.weight.detach().double().numpy(),
                                        pca.components_.T))
    assert angles.max() < 1.0
    xr = pca.inverse_transform(pca.transform(x.double().numpy()))
    ratio = reconstruction_error(ae, x)["mse"] / ((xr - x.double().numpy()) ** 2).mean()
    assert 1 - 1e-5 < ratio < 1.005


def test_contractive_penalty_of_linear_encoder_is_frobenius_norm():
    """J_f = W for f(x) = W x + b: ‖J‖²_F = ‖W‖²_F at every x, and the objective adds λ times
    it to the reconstruction loss."""
    torch.manual_seed(1)
    ae = LinearAutoencoder(6, 3).double()
    x = torch.rand(5, 6, dtype=torch.float64)
    penalty, z = jacobian_penalty(ae.encoder, x)
    frobenius = ae.encoder.weight.pow(2).sum()
    torch.testing.assert_close(penalty, frobenius.expand(5))
    torch.testing.assert_close(z, ae.encoder(x))
    objective = AutoencoderLoss(contractive=0.25).bind(ae).eval()
    recon, _ = ae.reconstruction_loss(x, x)
    torch.testing.assert_close(objective.losses(x), recon + 0.25 * frobenius)


def test_sigmoid_closed_form_equals_autograd_jacobian():
    """Rifai et al. (2011): for z = σ(W x + b), ‖J‖²_F = Σ_k (z_k(1−z_k))² ‖W_k‖²; equal to
    the autograd Jacobian, and so are their gradients with respect to W."""
    torch.manual_seed(2)
    encoder = nn.Sequential(nn.Linear(7, 4), nn.Sigmoid()).double()
    x = torch.randn(6, 7, dtype=torch.float64)
    exact, z = jacobian_penalty(encoder, x)
    closed = sigmoid_jacobian_penalty(encoder(x), encoder[0].weight)
    torch.testing.assert_close(closed, exact)
    g_exact, = torch.autograd.grad(exact.sum(), encoder[0].weight)
    g_closed, = torch.autograd.grad(closed.sum(), encoder[0].weight)
    torch.testing.assert_close(g_closed, g_exact)
    ae = Autoencoder(encoder, nn.Linear(4, 7).double())
    assert ae.sigmoid_code_layer() is encoder[0]
    assert DeepAutoencoder(7, 4).sigmoid_code_layer() is None


def test_sparsity_penalties_by_hand():
    z = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(l1_sparsity(z, 0.1), torch.tensor([0.3, 0.05],
                                                                 dtype=torch.float64))
    codes = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)  # means 0.2, 0.3
    rho = 0.05

    def kl(r):
        return rho * math.log(rho / r) + (1 - rho) * math.log((1 - rho) / (1 - r))

    expected = 2.0 * (kl(0.2) + kl(0.3))
    torch.testing.assert_close(kl_sparsity(codes, 2.0, rho),
                               torch.full((2,), expected, dtype=torch.float64))
    assert kl_sparsity(torch.full((3, 2), rho, dtype=torch.float64), 1.0, rho).abs().max() < 1e-12


def test_objective_adds_the_sparsity_penalty():
    torch.manual_seed(3)
    ae = DeepAutoencoder(5, 3, (4,), code_activation="relu").double()
    x = torch.rand(8, 5, dtype=torch.float64)
    objective = AutoencoderLoss(sparsity="l1", sparsity_weight=0.3).bind(ae).eval()
    recon, z = ae.reconstruction_loss(x, x)
    torch.testing.assert_close(objective.losses(x), recon + 0.3 * z.abs().sum(-1))
    value, loss = objective(x)
    torch.testing.assert_close(value, (recon + 0.3 * z.abs().sum(-1)).mean())
    with pytest.raises(ValueError, match="code_activation='sigmoid'"):
        AutoencoderLoss(sparsity="kl").bind(ae)


def test_mask_noise_fraction_within_binomial_stderr():
    """Each input is zeroed with probability ν: the zeroed fraction of n inputs lies within 4
    binomial standard errors sqrt(ν(1−ν)/n) of ν."""
    torch.manual_seed(4)
    nu, x = 0.3, torch.ones(200, 500)
    zeroed = (mask_noise(x, nu) == 0).double().mean().item()
    assert abs(zeroed - nu) < 4 * math.sqrt(nu * (1 - nu) / x.numel())


def test_gaussian_noise_scale_within_stderr():
    """The noise x̃ − x has sample standard deviation σ to within 4 standard errors
    σ / sqrt(2(n−1)), and mean 0 within 4 σ/sqrt(n)."""
    torch.manual_seed(5)
    sigma, x = 0.3, torch.rand(200, 500, dtype=torch.float64)
    noise = gaussian_noise(x, sigma) - x
    n = noise.numel()
    assert abs(noise.std().item() - sigma) < 4 * sigma / math.sqrt(2 * (n - 1))
    assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(n)


def test_corruption_only_while_training():
    torch.manual_seed(6)
    ae = DeepAutoencoder(5, 2, (4,))
    x = torch.rand(10, 5)
    objective = AutoencoderLoss(corruption="gaussian", noise_scale=0.5).bind(ae)
    clean = ae.reconstruction_loss(x, x)[0]
    torch.testing.assert_close(objective.eval().losses(x), clean)
    assert not torch.allclose(objective.train().losses(x), clean)


def test_mae_masks_exactly_and_scores_masked_patches_only():
    """16 patches of 7×7 on 28×28, 75% masked: exactly 12 per image; the loss ignores the
    target's visible patches and responds to its masked ones."""
    torch.manual_seed(7)
    mae = MaskedAutoencoder((28, 28), 7, embed_dim=16, depth=1, num_heads=2, decoder_dim=8,
                            decoder_num_heads=2).double()
    x = torch.rand(5, 784, dtype=torch.float64)
    torch.testing.assert_close(mae.unpatchify(mae.patchify(x)), x)
    noise = torch.rand(5, 16, dtype=torch.float64)
    loss, mask = mae.masked_loss(x, noise=noise)
    assert mask.shape == (5, 16) and (mask.sum(-1) == 12).all()
    visible_changed = mae.patchify(x.clone())
    visible_changed[~mask] += 1.0
    loss_v, _ = mae.masked_loss(x, mae.unpatchify(visible_changed), noise=noise)
    torch.testing.assert_close(loss_v, loss)
    masked_changed = mae.patchify(x.clone())
    masked_changed[mask] += 1.0
    loss_m, _ = mae.masked_loss(x, mae.unpatchify(masked_changed), noise=noise)
    assert (loss_m > loss).all()
    pred, _ = mae.predict(x, noise)
    by_hand = ((pred - mae.patchify(x)).pow(2).sum(-1) * mask).sum(-1)
    torch.testing.assert_close(loss, by_hand)
    recon, mask2 = mae.reconstruct(x, noise)
    torch.testing.assert_close(mae.patchify(recon)[~mask2], mae.patchify(x)[~mask2])
    assert mae.encode(x).shape == (5, 16)


def test_autoencoder_resume_equals_uninterrupted(tmp_path):
    """2 epochs + resume to 4 equals 4 epochs (history and weights), with the corruption's
    random draws restored from the checkpoint; in float64."""
    x = torch.rand(100, 12, dtype=torch.float64)

    def run(num_epochs, folder, resume=False, model=None):
        torch.manual_seed(0)
        model = model or DeepAutoencoder(12, 3, (8,)).double()
        loss = AutoencoderLoss(corruption="mask", mask_fraction=0.2, sparsity="l1",
                               sparsity_weight=0.01)
        history = fit(model, x, val=x[:20], loss=loss, num_epochs=num_epochs, batch_size=32,
                      seed=3, checkpoint_dir=folder, resume=resume, progress=False)
        return model, history

    full_model, full = run(4, tmp_path / "full")
    run(2, tmp_path / "split")
    resumed_model, resumed = run(4, tmp_path / "split", resume=True)
    assert resumed.column("train_loss") == full.column("train_loss")
    assert resumed.column("val_loss") == full.column("val_loss")
    assert full.column("train_loss")[-1] < full.column("train_loss")[0]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another configuration"):
        model = DeepAutoencoder(12, 3, (8,)).double()
        fit(model, x, loss=AutoencoderLoss(corruption="gaussian"), num_epochs=4, batch_size=32,
            seed=3, checkpoint_dir=tmp_path / "split", resume=True, progress=False)


def test_fit_refuses_losses_and_settings_that_do_not_fit_an_autoencoder():
    """The model is passed once; SVI losses and settings are refused with the two contracts
    named, and a keyword that moved names its replacement."""
    from pvae.inference import IWAE

    ae = DeepAutoencoder(4, 2, (3,))
    x = torch.rand(10, 4)
    with pytest.raises(TypeError, match="Pyro model.*autoencoder"):
        fit(ae, x, loss=IWAE(5), num_epochs=1)
    with pytest.raises(TypeError, match="Pyro model.*autoencoder"):
        fit(ae, x, loss=lambda model, guide, x: x.sum(), num_epochs=1)
    with pytest.raises(TypeError, match=r"num_particles=: it moved to the loss"):
        fit(ae, x, num_particles=5, num_epochs=1)
    with pytest.raises(TypeError, match=r"objective=: it moved to loss="):
        fit(ae, x, objective=AutoencoderLoss().bind(ae), num_epochs=1)


def test_probe_helpers_on_vae_posterior_means_and_codes():
    torch.manual_seed(8)
    vae = VAE(6, 2, (4,))
    x = torch.rand(30, 6)
    torch.testing.assert_close(encode_all(vae, x, batch_size=7), vae.encode(x)[0].detach())
    y = torch.arange(200) % 3
    z = nn.functional.one_hot(y).double() + 0.01 * torch.randn(200, 3, dtype=torch.float64)
    probe = linear_probe(z[:100], y[:100], z[100:], y[100:])
    assert probe["accuracy"] == 1.0 and probe["num_test"] == 100
    stats = code_statistics(torch.tensor([[0.0, 1.0, 1e-4, 2.0], [0.0, 0.0, 3.0, 1.0]]))
    assert stats["near_zero_fraction"] == pytest.approx(0.5)
    assert stats["dead_units"] == 1  # the first unit is 0 everywhere


def test_cli_train_and_evaluate_autoencoders(tmp_path):
    out = tmp_path / "ae"
    main(["train", "--dataset", "digits", "--model", "ae", "--latent-dim", "6", "--hidden-dims",
          "16", "--num-epochs", "2", "--num-train", "400", "--num-val", "100",
          "--code-activation", "sigmoid", "--sparsity", "kl", "--sparsity-weight", "0.1",
          "--corruption", "mask", "--no-progress", "--out",
          str(out)])
    main(["evaluate", str(out), "--probe-num-train", "400"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["reconstruction_mse"] < 1
    assert metrics["code"]["code_dim"] == 6
    # the probe's accuracy is sklearn's, recomputed here on the run's codes (400 training
    # images, the 359 test images), and well above chance (10 classes: 0.1, binomial SE 0.016)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pvae.runs import load_run

    model, _, _ = load_run(out, device="cpu")
    ds = data.load("digits")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        encode_all(model, ds.x_train[:400]).numpy(), ds.y_train[:400].numpy())
    accuracy = (clf.predict(encode_all(model, ds.x_test).numpy()) == ds.y_test.numpy()).mean()
    probe = metrics["linear_probe"]
    assert probe["num_test"] == len(ds.x_test) == 359 and probe["num_train"] == 400
    assert probe["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert probe["accuracy_stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 359))
    assert probe["accuracy"] > 0.3
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["loss"]["sparsity"] == "kl" and config["binarize"] is None
    assert (out / "figures" / "reconstructions.png").is_file()
    main(["train", "--dataset", "digits", "--model", "ae", "--latent-dim", "6", "--hidden-dims",
          "16", "--num-epochs", "3", "--num-train", "400", "--num-val", "100",
          "--code-activation", "sigmoid", "--sparsity", "kl", "--sparsity-weight", "0.1",
          "--corruption", "mask", "--no-progress", "--out",
          str(out), "--resume"])
    assert len((out / "history.csv").read_text().splitlines()) == 4  # header + 3 epochs
    mae = tmp_path / "mae"
    main(["train", "--dataset", "digits", "--model", "mae", "--latent-dim", "8",
          "--patch-size", "4", "--num-epochs", "1", "--num-train", "400", "--no-progress", "--out", str(mae)])
    main(["evaluate", str(mae), "--probe-num-train", "300"])
    metrics = json.loads((mae / "metrics.json").read_text())
    assert metrics["mask_ratio"] == 0.75 and metrics["masked_patch_mse"] > 0


def test_cli_refuses_penalties_for_the_masked_autoencoder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--model", "mae", "--patch-size", "4",
              "--latent-dim", "8", "--sparsity", "l1", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "drop sparsity" in capsys.readouterr().err
