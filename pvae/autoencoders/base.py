"""Deterministic autoencoders x -> z = f(x) -> x̂ = g(z): the generic :class:`Autoencoder`, the
:class:`LinearAutoencoder` (whose optimum spans the principal subspace) and the
:class:`DeepAutoencoder` (nonlinear PCA). Not Pyro programs: they are trained by
:func:`pvae.train.fit` with their loss, :class:`~pvae.autoencoders.AutoencoderLoss` (by default
the plain reconstruction loss: ``fit(ae, x)``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pvae.config import RecordsConfig
from pvae.contract import to_placement
from pvae.data import check_intensities
from pvae.nn import MLP
from pvae.validation import check_choice, check_count, check_sizes

__all__ = ["CODE_ACTIVATIONS", "LOSSES", "Autoencoder", "AutoencoderBase", "DeepAutoencoder",
           "LinearAutoencoder"]

#: Reconstruction losses, summed over the ``D`` inputs of a datapoint: ``"mse"`` Σ_d (x̂_d −
#: x_d)² (a Gaussian NLL up to scale and constant); ``"bce"`` Σ_d −x_d log x̂_d − (1 − x_d)
#: log(1 − x̂_d) (a Bernoulli NLL in nats for x in [0, 1]; the decoder outputs logits).
LOSSES = ("mse", "bce")

#: Activations of the code layer: ``identity`` (linear code), ``relu`` (non-negative, for L1
#: sparsity), ``sigmoid`` (in (0, 1), for KL sparsity towards a target activation ρ).
CODE_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class AutoencoderBase(RecordsConfig, nn.Module):
    """What every autoencoder shares: the recorded configuration (``config``,
    ``from_config``), its device and dtype, input placement and checks.

    Subclasses implement ``encode(x)`` and ``reconstruction_loss(x_in, target) -> (loss,
    code)``, the loss per datapoint of shape ``(batch,)``.
    """

    x_dim: int
    loss: str = "mse"

    def default_loss(self):
        """What ``fit(ae, x)`` trains: the plain reconstruction loss,
        :class:`~pvae.autoencoders.AutoencoderLoss` ``()``."""
        from pvae.autoencoders.objective import AutoencoderLoss  # (it imports this module)

        return AutoencoderLoss()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _place(self, x) -> torch.Tensor:
        """``x`` on the model's device and in its dtype, checked to be ``(batch, x_dim)``.

        :raises TypeError: not a floating-point tensor.
        :raises ValueError: another shape.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (batch, {self.x_dim}), got "
                            f"{type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}; use x.float()")
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must have shape (batch, {self.x_dim}) (images flattened), got "
                             f"{tuple(x.shape)}")
        return to_placement(x, self.device, self.dtype)

    def check_data(self, x: torch.Tensor | None, c=None) -> None:
        """A whole training set, once (:class:`pvae.train.TrainingData` calls it): shape,
        finite values, and [0, 1] intensities for the ``bce`` loss.

        :raises ValueError: conditioning data ``c`` (autoencoders take ``x`` only), another
            width, NaN/inf, or values outside [0, 1] with ``loss="bce"``.
        """
        if c is not None:
            raise ValueError("autoencoders are not conditional: pass x only (c=None)")
        if x is None:
            return
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must have shape (N, {self.x_dim}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf values; drop or impute them first")
        if self.loss == "bce":
            check_intensities(x, "loss='bce'")


class Autoencoder(AutoencoderBase):
    r"""A deterministic autoencoder: code z = f(x) (``encoder``), reconstruction x̂ = g(z)
    (``decoder``), trained to minimize a reconstruction loss summed over the inputs (Bishop &
    Bishop 2024, sec. 19.1), plus the penalties and corruptions of
    :class:`~pvae.autoencoders.AutoencoderLoss`.

    :param encoder: ``nn.Module`` ``(batch, x_dim) -> (batch, code_dim)``.
    :param decoder: ``nn.Module`` ``(batch, code_dim) -> (batch, x_dim)``: the reconstruction
        for ``loss="mse"``, its logits for ``loss="bce"``.
    :param str loss: ``"mse"`` or ``"bce"`` (:data:`LOSSES`).
    :param int x_dim: input width (found from a first ``nn.Linear`` of ``encoder`` if omitted).
    :raises ValueError: an unknown ``loss``, or ``x_dim`` neither given nor found.

    >>> ae = Autoencoder(nn.Linear(6, 2), nn.Linear(2, 6))
    >>> ae.encode(torch.zeros(4, 6)).shape
    torch.Size([4, 2])

    References:
      1. C. M. Bishop, H. Bishop, *Deep Learning: Foundations and Concepts*, ch. 19 (2024).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, loss: str = "mse",
                 x_dim: int | None = None):
        super().__init__()
        self.loss = check_choice("loss", loss, LOSSES)
        if x_dim is None:
            first = next((m for m in encoder.modules() if isinstance(m, nn.Linear)), None)
            if first is None:
                raise ValueError("pass x_dim: the encoder has no nn.Linear to read it from")
            x_dim = first.in_features
        self.x_dim = check_count("x_dim", x_dim)
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code z = f(x): ``(batch, x_dim) -> (batch, code_dim)``, on the model's device
        (``x`` may be anywhere)."""
        return self.encoder(self._place(x))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction g(z): ``(batch, code_dim) -> (batch, x_dim)`` (probabilities for
        ``loss="bce"``)."""
        out = self.decoder(to_placement(z, self.device, self.dtype))
        return torch.sigmoid(out) if self.loss == "bce" else out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """g(f(x)): ``(batch, x_dim) -> (batch, x_dim)``."""
        return self.decode(self.encode(x))

    def reconstruction_loss(self, x_in: torch.Tensor, target: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of reconstructing ``target`` from ``x_in`` (the same tensor, or a
        corrupted copy for a denoising autoencoder), summed over the ``x_dim`` inputs.

        :returns: ``(loss, z)``: ``(batch,)`` and the codes ``(batch, code_dim)``.
        """
        z = self.encoder(x_in)
        return self.loss_from_code(z, target), z

    def loss_from_code(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of decoding ``z``: ``(batch,)``."""
        out = self.decoder(z)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(-1)
        return (out - target).pow(2).sum(-1)

    def sigmoid_code_layer(self) -> nn.Linear | None:
        """The ``nn.Linear`` of an encoder that is one sigmoid layer z = σ(W x + b) (whose
        Jacobian has a closed form), else ``None``."""
        leaves = [m for m in self.encoder.modules() if not list(m.children())]
        if len(leaves) == 2 and isinstance(leaves[0], nn.Linear) and isinstance(
                leaves[1], nn.Sigmoid):
            return leaves[0]
        return None


class LinearAutoencoder(Autoencoder):
    r"""The linear autoencoder z = W₁ x + b₁, x̂ = W₂ z + b₂ with the squared-error loss.

    Its global minima are the projections onto the top-``code_dim`` principal subspace: the
    columns of W₂ span the leading eigenvectors of the data covariance, and every other
    critical point is a saddle (Bourlard & Kamp 1988; Baldi & Hornik 1989) — PCA is an
    autoencoder. The factors are identified only up to an invertible ``code_dim × code_dim``
    map, so compare subspaces (principal angles), not weights.

    Initialization: W₂ has orthonormal random columns and W₁ = W₂ᵀ (a random orthogonal
    projection: a well-conditioned start that gradient descent rotates into the principal
    subspace).

    :param int x_dim: input width D.
    :param int code_dim: code width k < D.
    :param str loss: ``"mse"`` (the PCA equivalence holds for it) or ``"bce"``.
    :raises ValueError: ``code_dim`` not below ``x_dim``.

    References:
      1. H. Bourlard, Y. Kamp, Auto-association by multilayer perceptrons and singular value
         decomposition, Biological Cybernetics 59 (1988).
      2. P. Baldi, K. Hornik, Neural networks and principal component analysis: learning from
         examples without local minima, Neural Networks 2 (1989).
    """

    def __init__(self, x_dim: int, code_dim: int, loss: str = "mse"):
        x_dim, code_dim = check_count("x_dim", x_dim), check_count("code_dim", code_dim)
        if code_dim >= x_dim:
            raise ValueError(f"code_dim must be below x_dim={x_dim} (a bottleneck), got "
                             f"{code_dim}")
        super().__init__(nn.Linear(x_dim, code_dim), nn.Linear(code_dim, x_dim), loss, x_dim)
        self.code_dim = code_dim
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(x_dim, code_dim, dtype=torch.float64))
            self.decoder.weight.copy_(q)
            self.encoder.weight.copy_(q.T)
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()


class DeepAutoencoder(Autoencoder):
    """A fully connected autoencoder ``x_dim -> hidden_dims -> code_dim -> reversed(hidden_dims)
    -> x_dim``: nonlinear PCA (Kramer 1991; Hinton & Salakhutdinov 2006).

    :param int x_dim: input width.
    :param int code_dim: code width.
    :param hidden_dims: widths of the encoder's hidden layers (the decoder mirrors them); empty
        for a one-layer encoder z = a(W x + b).
    :param str activation: hidden activation, a key of :data:`pvae.nn.ACTIVATIONS`.
    :param str code_activation: a key of :data:`CODE_ACTIVATIONS`.
    :param str loss: ``"mse"`` or ``"bce"``.

    References:
      1. M. A. Kramer, Nonlinear principal component analysis using autoassociative neural
         networks, AIChE Journal 37 (1991).
      2. G. E. Hinton, R. R. Salakhutdinov, Reducing the dimensionality of data with neural
         networks, Science 313 (2006).
    """

    def __init__(self, x_dim: int, code_dim: int, hidden_dims: Sequence[int] = (256,),
                 activation: str = "relu", code_activation: str = "identity",
                 loss: str = "mse"):
        x_dim, code_dim = check_count("x_dim", x_dim), check_count("code_dim", code_dim)
        hidden_dims = check_sizes("hidden_dims", hidden_dims)
        check_choice("code_activation", code_activation, CODE_ACTIVATIONS)
        encoder = nn.Sequential(MLP(x_dim, hidden_dims, code_dim, activation),
                                CODE_ACTIVATIONS[code_activation]())
        decoder = MLP(code_dim, hidden_dims[::-1], x_dim, activation)
        super().__init__(encoder, decoder, loss, x_dim)
        self.code_dim, self.code_activation = code_dim, code_activation
