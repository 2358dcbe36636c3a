"""The training objective of an autoencoder: reconstruction loss plus composable penalties
and input corruption, as a module that :func:`pvae.train.fit` steps like the SVI objective."""

from __future__ import annotations

import torch
from torch import nn

from pvae.autoencoders.base import Autoencoder, AutoencoderBase
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
from pvae.validation import check_choice, check_float

__all__ = ["AutoencoderObjective"]


class AutoencoderObjective(nn.Module):
    r"""Reconstruction loss + penalties for an autoencoder, per datapoint:

    loss(x) = ℓ(x, g(f(x̃))) + λ_s S(z) + λ_c ‖J_f(x̃)‖²_F,

    with x̃ = x, or a corrupted copy while training (denoising); z = f(x̃); S the L1 or KL
    sparsity penalty (:mod:`pvae.autoencoders.penalties`). Every part is optional and they
    combine freely (a sparse denoising autoencoder is one objective).

    The training engine's contract (:func:`pvae.train.fit`): ``objective(x) -> (value,
    loss)``, both the mean loss per datapoint over the batch (``value`` detached); the history
    names them ``train_loss`` / ``val_loss`` (:attr:`value_name`; lower is better, in the
    units of ℓ: squared error or nats, summed over the inputs of one image). In ``eval()``
    mode (validation) the input is not corrupted.

    :param autoencoder: an :class:`~pvae.autoencoders.Autoencoder`, or a
        :class:`~pvae.autoencoders.MaskedAutoencoder` (whose loss is on masked patches; it
        takes no penalty or corruption).
    :param sparsity: ``None``, ``"l1"`` (λ Σ_k |z_k|) or ``"kl"`` (λ Σ_k KL(ρ ‖ ρ̂_k)).
    :param float sparsity_weight: λ_s.
    :param float target_activation: ρ in (0, 1), for ``"kl"``.
    :param corruption: ``None``, ``"gaussian"`` (x + σ ε) or ``"mask"`` (a fraction ν of
        inputs set to 0).
    :param float noise_scale: σ, for ``"gaussian"``.
    :param float mask_fraction: ν in [0, 1), for ``"mask"``.
    :param float contractive: λ_c; 0 turns the contractive penalty off. The exact Frobenius
        norm of the encoder's Jacobian, in closed form for a one-layer sigmoid encoder and by
        autograd otherwise.
    :raises TypeError: ``autoencoder`` is not an autoencoder.
    :raises ValueError: an unknown name or an out-of-range weight, or penalties asked of a
        masked autoencoder.
    """

    value_name = "loss"

    def __init__(self, autoencoder, *, sparsity: str | None = None,
                 sparsity_weight: float = 1e-3, target_activation: float = 0.05,
                 corruption: str | None = None, noise_scale: float = 0.3,
                 mask_fraction: float = 0.3, contractive: float = 0.0):
        super().__init__()
        if not isinstance(autoencoder, AutoencoderBase):
            raise TypeError(f"AutoencoderObjective needs a pvae autoencoder, got "
                            f"{type(autoencoder).__name__}")
        if sparsity is not None:
            check_choice("sparsity", sparsity, SPARSITY)
        if corruption is not None:
            check_choice("corruption", corruption, CORRUPTIONS)
        self.sparsity, self.corruption = sparsity, corruption
        self.sparsity_weight = check_float("sparsity_weight", sparsity_weight, minimum=0.0)
        self.target_activation = check_float("target_activation", target_activation,
                                             minimum=0.0, maximum=1.0, strict=True)
        if self.target_activation >= 1.0:
            raise ValueError(f"target_activation must lie in (0, 1), got {target_activation!r}")
        self.noise_scale = check_float("noise_scale", noise_scale, minimum=0.0)
        self.mask_fraction = check_float("mask_fraction", mask_fraction, minimum=0.0,
                                         maximum=1.0)
        if self.mask_fraction >= 1.0:
            raise ValueError(f"mask_fraction must lie in [0, 1) (1 would erase every input), "
                             f"got {mask_fraction!r}")
        self.contractive = check_float("contractive", contractive, minimum=0.0)
        plain = sparsity is None and corruption is None and self.contractive == 0
        if not isinstance(autoencoder, Autoencoder) and not plain:
            raise ValueError(f"{type(autoencoder).__name__} trains on its own masked-patch loss; "
                             "drop sparsity, corruption and contractive")
        code_activation = getattr(autoencoder, "code_activation", "sigmoid")
        if sparsity == "kl" and code_activation != "sigmoid":
            raise ValueError(f"sparsity='kl' needs codes in (0, 1): build the autoencoder with "
                             f"code_activation='sigmoid', not {code_activation!r}")
        object.__setattr__(self, "autoencoder", autoencoder)  # not a submodule: saved on its own
        self.trusted = False  # the engine's flag; the checks live in check_data

    @property
    def config(self) -> dict:
        """The settings, for checkpoints and run folders."""
        return {"sparsity": self.sparsity, "sparsity_weight": self.sparsity_weight,
                "target_activation": self.target_activation, "corruption": self.corruption,
                "noise_scale": self.noise_scale, "mask_fraction": self.mask_fraction,
                "contractive": self.contractive}

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """x̃: ``x`` with the objective's corruption (``x`` itself without one)."""
        if self.corruption == "gaussian":
            return gaussian_noise(x, self.noise_scale)
        if self.corruption == "mask":
            return mask_noise(x, self.mask_fraction)
        return x

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        """The loss of every datapoint: ``(batch, x_dim) -> (batch,)``."""
        ae = self.autoencoder
        x_in = self.corrupt(x) if self.training else x
        if self.contractive > 0:
            layer = ae.sigmoid_code_layer()
            if layer is not None:
                z = ae.encoder(x_in)
                penalty = sigmoid_jacobian_penalty(z, layer.weight)
            else:
                penalty, z = jacobian_penalty(ae.encoder, x_in)
            loss = ae.loss_from_code(z, x) + self.contractive * penalty
        else:
            loss, z = ae.reconstruction_loss(x_in, x)
        if self.sparsity == "l1":
            loss = loss + l1_sparsity(z, self.sparsity_weight)
        elif self.sparsity == "kl":
            loss = loss + kl_sparsity(z, self.sparsity_weight, self.target_activation)
        return loss

    def forward(self, x: torch.Tensor, *rest) -> tuple[torch.Tensor, torch.Tensor]:
        if rest:
            raise TypeError("autoencoders take x only; got conditioning data as well")
        loss = self.losses(x).mean()
        return loss.detach(), loss

    def set_step(self, step: int) -> None:
        """Nothing is scheduled."""

    def metrics(self) -> dict:
        """Nothing per step to record."""
        return {}

    def trainable_parameters(self, *batch) -> list[torch.Tensor]:
        """The autoencoder's parameters (the objective has none); runs the objective once on
        ``batch`` to check that it works."""
        self(*batch)
        params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the autoencoder has no trainable parameters")
        return params
