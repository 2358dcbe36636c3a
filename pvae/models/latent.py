r"""Walks through a model's latent space: interpolation between the codes of two inputs and
traversals of one latent dimension at a time.

Both work on any model offering the built-in conveniences ``encode(x, c) -> (loc, scale)`` of
a Gaussian guide and ``decode(z, c) -> E[x | z]`` (every VAE of :mod:`pvae.models`; for a
hierarchical model, its bottom latent layer).

- Linear interpolation z(t) = (1 - t) z_a + t z_b between the posterior means
  (Bishop & Bishop, Deep Learning, §19.2: "interpolate between numbers").
- Spherical interpolation (slerp; Shoemake 1985; White 2016, "Sampling Generative Networks",
  §2.3): z(t) = sin((1 - t) w) / sin(w) z_a + sin(t w) / sin(w) z_b with
  cos(w) = z_a . z_b / (|z_a| |z_b|). Under a standard-normal prior in d dimensions, draws have
  norms near sqrt(d) and are nearly orthogonal; the linear midpoint of two of them has norm
  near sqrt(d / 2), a region the prior almost never visits, while the spherical path keeps the
  norm of its endpoints.
"""

from __future__ import annotations

import torch

from pvae.validation import check_choice, check_count, check_float

__all__ = ["INTERPOLATIONS", "interpolate", "latent_path", "traverse"]

#: Interpolation methods of :func:`interpolate`.
INTERPOLATIONS = ("linear", "spherical")


def latent_path(z_a: torch.Tensor, z_b: torch.Tensor, num_steps: int,
                method: str = "linear") -> torch.Tensor:
    """Points from ``z_a`` to ``z_b`` (both ``(..., d)``), endpoints included:
    ``(num_steps, ..., d)``.

    :param str method: ``"linear"`` or ``"spherical"`` (slerp; where the two codes are parallel,
        sin(w) < 1e-6, the linear path, its limit).
    :raises ValueError: ``num_steps < 2``, unknown method, shapes that differ.
    """
    num_steps = check_count("num_steps", num_steps, minimum=2)
    check_choice("method", method, INTERPOLATIONS)
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    t = torch.linspace(0, 1, num_steps, device=z_a.device, dtype=z_a.dtype)
    t = t.reshape(-1, *([1] * z_a.dim()))
    linear = (1 - t) * z_a + t * z_b
    if method == "linear":
        return linear
    norms = z_a.norm(dim=-1, keepdim=True) * z_b.norm(dim=-1, keepdim=True)
    cos = ((z_a * z_b).sum(-1, keepdim=True) / norms.clamp_min(torch.finfo(z_a.dtype).tiny))
    omega = cos.clamp(-1, 1).acos()
    sin = omega.sin()
    parallel = sin < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    slerp = ((((1 - t) * omega).sin() * z_a + (t * omega).sin() * z_b) / safe)
    return torch.where(parallel, linear, slerp)


def _conveniences(model):
    for attr in ("encode", "decode"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"latent-space walks need a model with encode(x, c) and decode(z, c) "
                            f"(the built-in VAEs); {type(model).__name__} has no {attr}")


def _rows(x, name: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (one image (D,) or a batch (n, D)), got "
                        f"{type(x).__name__}")
    return (x.unsqueeze(0), True) if x.dim() == 1 else (x, False)


@torch.no_grad()
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, num_steps: int = 10,
                method: str = "linear", c=None) -> torch.Tensor:
    """Decoded images E[x | z(t)] along a path between the posterior means E_q[z | x_a] and
    E_q[z | x_b]; the endpoints are the reconstructions of ``x_a`` and ``x_b``.

    :param x_a: one input ``(D,)`` or a batch ``(n, D)``; ``x_b`` alike.
    :param int num_steps: points on the path, endpoints included (>= 2).
    :param str method: ``"linear"`` or ``"spherical"`` (see :func:`latent_path`).
    :param c: conditioning of both inputs, for conditional models.
    :returns: ``(num_steps, D)`` for single inputs, ``(n, num_steps, D)`` for batches, on the
        model's device.
    :raises TypeError: the model lacks ``encode``/``decode``, inputs are not tensors.
    :raises ValueError: bad ``num_steps`` / ``method``, inputs of different shapes.
    """
    _conveniences(model)
    (x_a, single), (x_b, _) = _rows(x_a, "x_a"), _rows(x_b, "x_b")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and "
                         f"{tuple(x_b.shape)}")
    z = latent_path(model.encode(x_a, c)[0], model.encode(x_b, c)[0], num_steps, method)
    n = len(x_a)
    out = model.decode(z.reshape(num_steps * n, -1), _tile(c, num_steps))
    out = out.reshape(num_steps, n, -1)
    return out[:, 0] if single else out.transpose(0, 1)


@torch.no_grad()
def traverse(model, x: torch.Tensor, dims=None, num_steps: int = 9, span: float = 2.5,
             c=None) -> torch.Tensor:
    """Latent traversals around one input's code: for each latent dimension j in ``dims``, the
    decoded images of z = E_q[z | x] + v e_j for ``num_steps`` offsets v evenly spaced in
    ``[-span, span]`` (in units of the standard-normal prior's standard deviation; Higgins et
    al. 2017, "beta-VAE", fig. 7).

    :param x: one input ``(D,)`` (or ``(1, D)``).
    :param dims: latent dimensions to traverse (default: all).
    :param int num_steps: images per dimension (>= 2).
    :param float span: largest offset (> 0).
    :param c: the input's conditioning, for conditional models.
    :returns: ``(len(dims), num_steps, D)``.
    :raises TypeError: the model lacks ``encode``/``decode``.
    :raises ValueError: more than one input, bad ``dims``, ``num_steps`` or ``span``.
    """
    _conveniences(model)
    x, _ = _rows(x, "x")
    if len(x) != 1:
        raise ValueError(f"traverse takes one input x of shape (D,), got {tuple(x.shape)}")
    num_steps = check_count("num_steps", num_steps, minimum=2)
    span = check_float("span", span, minimum=0.0, strict=True)
    loc = model.encode(x, _tile(c, 1))[0][0]
    d = loc.shape[-1]
    dims = list(range(d)) if dims is None else [int(j) for j in dims]
    if not dims or any(not 0 <= j < d for j in dims):
        raise ValueError(f"dims must be latent dimensions in [0, {d}), got {dims}")
    offsets = torch.linspace(-span, span, num_steps, device=loc.device, dtype=loc.dtype)
    z = loc.repeat(len(dims), num_steps, 1)
    for i, j in enumerate(dims):
        z[i, :, j] += offsets
    out = model.decode(z.reshape(len(dims) * num_steps, d), _tile(c, len(dims) * num_steps))
    return out.reshape(len(dims), num_steps, -1)


def _tile(c, times: int):
    """The conditioning rows ``c`` (``(n, ...)``, or one label) repeated ``times`` times along
    the batch dim (``None`` stays ``None``)."""
    if c is None:
        return None
    c = torch.as_tensor(c)
    c = c.unsqueeze(0) if c.dim() == 0 else c
    return c.repeat(times, *([1] * (c.dim() - 1)))
