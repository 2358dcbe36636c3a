"""The training loss of an autoencoder: reconstruction loss plus composable penalties and input
corruption (:class:`AutoencoderLoss`, the settings), and the module that :func:`pvae.train.fit`
steps like the SVI objective (:class:`AutoencoderObjective`)."""

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
from pvae.config import RecordsConfig
from pvae.validation import check_choice, check_float

__all__ = ["AutoencoderLoss", "AutoencoderObjective"]


class AutoencoderLoss(RecordsConfig):
    r"""Reconstruction loss + penalties for an autoencoder, per datapoint, as a loss object
    that :func:`pvae.train.fit` binds to the autoencoder it trains
    (``fit(ae, x, loss=AutoencoderLoss(sparsity="l1"))``; ``fit(ae, x)`` uses
    ``AutoencoderLoss()``, the plain reconstruction loss):

    loss(x) = ℓ(x, g(f(x̃))) + λ_s S(z) + λ_c ‖J_f(x̃)‖²_F,

    with x̃ = x, or a corrupted copy while training (denoising); z = f(x̃); S the L1 or KL
    sparsity penalty (:mod:`pvae.autoencoders.penalties`). Every part is optional and they
    combine freely (a sparse denoising autoencoder is one loss).

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
    :raises ValueError: an unknown name or an out-of-range weight.
    """

    def __init__(self, *, sparsity: str | None = None, sparsity_weight: float = 1e-3,
                 target_activation: float = 0.05, corruption: str | None = None,
                 noise_scale: float = 0.3, mask_fraction: float = 0.3,
                 contractive: float = 0.0):
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

    @property
    def config(self) -> dict:
        """The settings, for checkpoints and run folders."""
        return {"name": type(self).__name__, **super().config}

    @property
    def plain(self) -> bool:
        """No penalty and no corruption: the reconstruction loss alone."""
        return self.sparsity is None and self.corruption is None and self.contractive == 0

    def bind(self, autoencoder) -> AutoencoderObjective:
        """This loss on ``autoencoder``, as the module the training loop steps.

        :raises TypeError: ``autoencoder`` is not a pvae autoencoder.
        :raises ValueError: penalties asked of a masked autoencoder, or KL sparsity without
            codes in (0, 1).
        """
        return AutoencoderObjective(autoencoder, self)


class AutoencoderObjective(nn.Module):
    r"""An :class:`AutoencoderLoss` bound to an autoencoder: the module the training loop steps
    (the :class:`pvae.train.Objective` protocol). ``objective(x) -> (value, loss)``, both the
    mean loss per datapoint over the batch (``value`` detached); the history names them
    ``train_loss`` / ``val_loss`` (:attr:`value_name`; lower is better, in the units of ℓ:
    squared error or nats, summed over the inputs of one image). In ``eval()`` mode
    (validation) the input is not corrupted.

    :param autoencoder: an :class:`~pvae.autoencoders.Autoencoder`, or a
        :class:`~pvae.autoencoders.MaskedAutoencoder` (whose loss is on masked patches; it
        takes no penalty or corruption).
    :param AutoencoderLoss loss: the settings (default: the plain reconstruction loss).
    :raises TypeError: ``autoencoder`` is not an autoencoder.
    :raises ValueError: penalties asked of a masked autoencoder, or KL sparsity without codes
        in (0, 1).
    """

    value_name = "loss"

    def __init__(self, autoencoder, loss: AutoencoderLoss | None = None):
        super().__init__()
        if not isinstance(autoencoder, AutoencoderBase):
            raise TypeError(f"an autoencoder's loss trains a pvae autoencoder, got "
                            f"{type(autoencoder).__name__}")
        loss = AutoencoderLoss() if loss is None else loss
        if not isinstance(autoencoder, Autoencoder) and not loss.plain:
            raise ValueError(f"{type(autoencoder).__name__} trains on its own masked-patch loss; "
                             "drop sparsity, corruption and contractive")
        code_activation = getattr(autoencoder, "code_activation", "sigmoid")
        if loss.sparsity == "kl" and code_activation != "sigmoid":
            raise ValueError(f"sparsity='kl' needs codes in (0, 1): build the autoencoder with "
                             f"code_activation='sigmoid', not {code_activation!r}")
        object.__setattr__(self, "autoencoder", autoencoder)  # not a submodule: saved on its own
        object.__setattr__(self, "loss", loss)
        self.trusted = False  # the engine's flag; the checks live in check_data
        self.num_data = 0  # datapoints of the last call

    @property
    def config(self) -> dict:
        """The loss's settings (:attr:`AutoencoderLoss.config`)."""
        return self.loss.config

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """x̃: ``x`` with the objective's corruption (``x`` itself without one)."""
        loss = self.loss
        if loss.corruption == "gaussian":
            return gaussian_noise(x, loss.noise_scale)
        if loss.corruption == "mask":
            return mask_noise(x, loss.mask_fraction)
        return x

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        """The loss of every datapoint: ``(batch, x_dim) -> (batch,)``."""
        ae, settings = self.autoencoder, self.loss
        x_in = self.corrupt(x) if self.training else x
        if settings.contractive > 0:
            layer = ae.sigmoid_code_layer()
            if layer is not None:
                z = ae.encoder(x_in)
                penalty = sigmoid_jacobian_penalty(z, layer.weight)
            else:
                penalty, z = jacobian_penalty(ae.encoder, x_in)
            loss = ae.loss_from_code(z, x) + settings.contractive * penalty
        else:
            loss, z = ae.reconstruction_loss(x_in, x)
        if settings.sparsity == "l1":
            loss = loss + l1_sparsity(z, settings.sparsity_weight)
        elif settings.sparsity == "kl":
            loss = loss + kl_sparsity(z, settings.sparsity_weight, settings.target_activation)
        return loss

    def forward(self, x: torch.Tensor, *rest) -> tuple[torch.Tensor, torch.Tensor]:
        if rest:
            raise TypeError("autoencoders take x only; got conditioning data as well")
        loss = self.losses(x).mean()
        self.num_data = len(x)
        return loss.detach(), loss

    def set_step(self, step: int) -> None:
        """Nothing is scheduled."""

    def metrics(self) -> dict:
        """Nothing per step to record."""
        return {}

    def settled(self) -> bool:
        """Always: nothing is annealed."""
        return True

    def needs_whole_batches(self, *batch) -> bool:
        """Never: any rows of x make a batch."""
        return False

    def validation(self) -> AutoencoderObjective:
        """Itself: in ``eval()`` mode (validation) the input is not corrupted."""
        return self

    def capture_blocker(self) -> str | None:
        return "autoencoder objectives train eagerly"

    def capturable_(self, like: torch.Tensor) -> AutoencoderObjective:
        return self

    def data_parallel_(self) -> None:
        """Nothing is kept across steps."""

    def trainable_parameters(self, *batch) -> list[torch.Tensor]:
        """The autoencoder's parameters (the objective has none); runs the objective once on
        ``batch`` to check that it works."""
        self(*batch)
        params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the autoencoder has no trainable parameters")
        return params
