"""Deterministic autoencoders (not Pyro programs), trained by :func:`pvae.train.fit` with an
:class:`AutoencoderLoss` (``fit(ae, x)``: the plain reconstruction loss): linear (= PCA),
deep, sparse, denoising, contractive and masked; with the evaluation helpers (reconstruction
error, code statistics, linear probe) that serve the VAEs too."""

from pvae.autoencoders.base import (
    CODE_ACTIVATIONS,
    LOSSES,
    Autoencoder,
    AutoencoderBase,
    DeepAutoencoder,
    LinearAutoencoder,
)
from pvae.autoencoders.mae import MaskedAutoencoder
from pvae.autoencoders.objective import AutoencoderLoss, AutoencoderObjective
from pvae.autoencoders.penalties import (
    CORRUPTIONS,
    SPARSITY,
    gaussian_noise,
    jacobian_penalty,
    kl_sparsity,
    l1_sparsity,
    mask_noise,
    sigmoid_jacobian_penalty,
)
from pvae.autoencoders.probe import code_statistics, encode_all, linear_probe, reconstruction_error

#: Autoencoders by name: ``--model`` on the command line and ``"model"`` in a run folder's
#: ``config.json`` (rebuilt with ``AUTOENCODERS[name].from_config(...)``).
AUTOENCODERS = {"ae": DeepAutoencoder, "linear-ae": LinearAutoencoder, "mae": MaskedAutoencoder}

__all__ = ["AUTOENCODERS", "CODE_ACTIVATIONS", "CORRUPTIONS", "LOSSES", "SPARSITY", "Autoencoder",
           "AutoencoderBase", "AutoencoderLoss", "AutoencoderObjective", "DeepAutoencoder", "LinearAutoencoder",
           "MaskedAutoencoder", "code_statistics", "encode_all", "gaussian_noise",
           "jacobian_penalty", "kl_sparsity", "l1_sparsity", "linear_probe", "mask_noise",
           "reconstruction_error", "sigmoid_jacobian_penalty"]
