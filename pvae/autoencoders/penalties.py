"""Penalties on the code and corruptions of the input: the parts that make an autoencoder
sparse, denoising or contractive (combined by :class:`~pvae.autoencoders.AutoencoderLoss`).

Every penalty is returned per datapoint, shape ``(batch,)``, in the units of the loss it is
added to (the reconstruction loss summed over the inputs of one datapoint).
"""

from __future__ import annotations

import torch

__all__ = ["CORRUPTIONS", "SPARSITY", "gaussian_noise", "jacobian_penalty", "kl_sparsity",
           "l1_sparsity", "mask_noise", "sigmoid_jacobian_penalty"]


def l1_sparsity(z: torch.Tensor, weight: float) -> torch.Tensor:
    r"""λ Σ_k |z_k| per datapoint (Bishop & Bishop 2024, eq. 19.2).

    :param z: codes ``(batch, code_dim)``.
    :param float weight: λ.
    :returns: ``(batch,)``.
    """
    return weight * z.abs().sum(-1)


def kl_sparsity(z: torch.Tensor, weight: float, target: float, eps: float = 1e-6
                ) -> torch.Tensor:
    r"""λ Σ_k KL(ρ ‖ ρ̂_k), ρ̂_k = the mean activation of code unit k over the batch:
    KL(ρ ‖ ρ̂) = ρ log(ρ/ρ̂) + (1 − ρ) log((1 − ρ)/(1 − ρ̂)) (Ng 2011, sec. 3). The codes must
    lie in (0, 1) (a sigmoid code layer); ρ̂ is clamped to [eps, 1 − eps].

    A batch statistic: the same value for every datapoint of the batch.

    :param z: codes ``(batch, code_dim)`` in (0, 1).
    :param float weight: λ.
    :param float target: the target activation ρ in (0, 1).
    :returns: ``(batch,)``.

    References:
      1. A. Ng, Sparse autoencoder, CS294A lecture notes, Stanford (2011).
    """
    rho_hat = z.mean(0).clamp(eps, 1 - eps)
    kl = target * torch.log(target / rho_hat) + (1 - target) * torch.log(
        (1 - target) / (1 - rho_hat))
    return (weight * kl.sum()).expand(z.shape[0])


def jacobian_penalty(encoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""‖J_f(x)‖²_F = Σ_{k,d} (∂z_k/∂x_d)² per datapoint, exact, by autograd (Rifai et al.
    2011, eq. 2): one batched vector-Jacobian product per code unit (``is_grads_batched``),
    with ``create_graph`` so that the penalty can be differentiated. Assumes that each
    datapoint's code depends on its own input only (no batch statistics in ``encoder``).

    :param encoder: ``(batch, D) -> (batch, code_dim)``.
    :param x: inputs ``(batch, D)``.
    :returns: ``(penalty, z)``: ``(batch,)`` and the codes ``(batch, code_dim)``.

    References:
      1. S. Rifai, P. Vincent, X. Muller, X. Glorot, Y. Bengio, Contractive auto-encoders:
         explicit invariance during feature extraction, ICML 2011.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        z = encoder(x)
        k = z.shape[-1]
        basis = torch.eye(k, device=z.device, dtype=z.dtype).unsqueeze(1).expand(k, *z.shape)
        (jac,) = torch.autograd.grad(z, x, grad_outputs=basis, is_grads_batched=True,
                                     create_graph=True)  # (code_dim, batch, D)
    return jac.pow(2).sum((0, 2)), z


def sigmoid_jacobian_penalty(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    r"""‖J‖²_F of one sigmoid layer z = σ(W x + b) in closed form: J = diag(z ⊙ (1 − z)) W, so
    ‖J‖²_F = Σ_k (z_k (1 − z_k))² Σ_d W_kd² (Rifai et al. 2011, sec. 4).

    :param z: the layer's output ``(batch, code_dim)``.
    :param weight: W, ``(code_dim, D)``.
    :returns: ``(batch,)``.
    """
    return ((z * (1 - z)).pow(2) * weight.pow(2).sum(-1)).sum(-1)


def gaussian_noise(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x̃ = x + σ ε, ε ~ N(0, I) (Bishop & Bishop 2024, sec. 19.1.3)."""
    return x + scale * torch.randn_like(x)


def mask_noise(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """x̃: each input set to zero independently with probability ν = ``fraction`` (masking
    noise, Vincent et al. 2008, sec. 2.3; Bishop & Bishop 2024, eq. 19.3).

    References:
      1. P. Vincent, H. Larochelle, Y. Bengio, P.-A. Manzagol, Extracting and composing robust
         features with denoising autoencoders, ICML 2008.
    """
    return x * (torch.rand_like(x) >= fraction).to(x.dtype)


#: Sparsity penalties by name (``--sparsity``).
SPARSITY = ("l1", "kl")
#: Corruptions by name (``--corruption``).
CORRUPTIONS = {"gaussian": gaussian_noise, "mask": mask_noise}
