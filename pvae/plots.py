"""Matplotlib figures: training curves, image grids, the 2-D latent manifold, KL per dimension.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global
figure state, no backend chosen at import: figures show inline in Jupyter and save anywhere)
and, given ``path``, saves it as PNG, atomically (never a half-written file, never through a
link).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch.distributions import Normal

from pvae.files import write_bytes
from pvae.models import interpolate, traverse

__all__ = ["gradient_variance", "image_grid", "interpolations", "kl_per_dim", "latent_embedding",
           "latent_manifold", "posterior_ellipses", "posterior_forest", "training_curve",
           "traversals"]


def _finish(fig, path):
    """Save ``fig`` at ``path`` (if given) atomically: drawn into memory first, then written to
    a fresh temporary file renamed into place (:func:`pvae.files.write_bytes`), so a kill while
    drawing or writing leaves the previous figure or none, never a truncated one, and a link at
    ``path`` is replaced, not written through. The format is the suffix's (PNG by default).

    :raises pvae.files.WriteError: the file cannot be written.
    """
    if path is not None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=110,
                    bbox_inches="tight")
        write_bytes(path, buffer.getvalue())
    return fig


def training_curve(history, path=None):
    """Train and validation ELBO (nats per datapoint) against epoch; for a history that records
    a loss instead (``train_loss``, an autoencoder's objective), the loss."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    epochs = history.column("epoch")
    first = history.rows[0] if len(history) else {}
    name, short, label = (("loss", "loss", "loss per datapoint") if "train_loss" in first
                          else ("elbo", "ELBO", "ELBO (nats per datapoint)"))
    ax.plot(epochs, history.column(f"train_{name}"), "o-", label=f"train {short}")
    val = history.column(f"val_{name}")
    if any(v == v for v in val):  # any non-NaN
        ax.plot(epochs, val, "s-", label=f"validation {short}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def image_grid(rows: list, image_shape, *, row_labels=None, path=None, title=None):
    """A grid of images: ``rows`` is a list of ``(num_cols, D)`` tensors (one per row)."""
    rows = [torch.as_tensor(r).detach().cpu().float() for r in rows]
    num_rows, num_cols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(num_cols * 0.9, num_rows * 0.9 + 0.3))
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    for i, r in enumerate(rows):
        for j in range(num_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(r):
                ax.imshow(r[j].reshape(image_shape).numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
        if row_labels:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def latent_manifold(decode, image_shape, *, num_per_side: int = 15, path=None, device=None,
                    dtype=None):
    """Decoded images on a grid of z in the 2-D latent space, placed at the standard normal's
    quantiles 0.05..0.95 (Kingma & Welling 2014, fig. 4)."""
    q = torch.linspace(0.05, 0.95, num_per_side, dtype=torch.float64)
    grid = Normal(0.0, 1.0).icdf(q)
    z = torch.cartesian_prod(grid.flip(0), grid)[:, [1, 0]].to(device=device, dtype=dtype)
    images = decode(z).detach().cpu().float().reshape(num_per_side, num_per_side, *image_shape)
    h, w = image_shape
    canvas = images.permute(0, 2, 1, 3).reshape(num_per_side * h, num_per_side * w).numpy()
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, extent=(0.05, 0.95, 0.05, 0.95))
    ax.set_xlabel("Φ(z₁)")
    ax.set_ylabel("Φ(z₂)")
    ax.set_title("latent manifold")
    return _finish(fig, path)


def latent_embedding(codes, labels=None, *, tsne_points: int = 2000, seed: int = 0, path=None):
    """The latent codes of a dataset (a VAE's posterior means, an autoencoder's codes)
    ``(N, latent_dim)`` in two dimensions: by PCA (scikit-learn's ``PCA``, all points) and by
    t-SNE (van der Maaten & Hinton 2008; scikit-learn's ``TSNE``, PCA-initialized, seeded) of
    the first ``tsne_points``, one panel each, coloured by ``labels`` ``(N,)`` where given.
    Codes of one dimension are drawn against zero; t-SNE needs at least 5 points.

    :param int tsne_points: the most points t-SNE embeds (its cost grows as N log N; 0: PCA
        alone).
    :raises ValueError: ``codes`` is not a 2-D array with at least two rows.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    codes = np.asarray(torch.as_tensor(codes).detach().cpu().double())
    if codes.ndim != 2 or len(codes) < 2:
        raise ValueError(f"codes must be (N, latent_dim) with N >= 2, got shape {codes.shape}")
    labels = None if labels is None else np.asarray(torch.as_tensor(labels).cpu())
    if labels is not None and len(np.unique(labels)) < 2:
        labels = None
    if codes.shape[1] == 1:
        pca = np.concatenate([codes - codes.mean(), np.zeros_like(codes)], 1)
    else:
        pca = PCA(n_components=2, random_state=seed).fit_transform(codes)
    panels = [("PCA", pca, labels)]
    m = min(tsne_points, len(codes))
    if m >= 5 and codes.shape[1] >= 2:
        # one OpenMP thread: on a machine whose cores are busy, t-SNE's spinning threads ran
        # 7-10x slower with two than with one (2000 points of 50-D: ~10 s on one core)
        with threadpool_limits(limits=1, user_api="openmp"):
            tsne = TSNE(n_components=2, perplexity=min(30.0, (m - 1) / 3), init="pca",
                        random_state=seed).fit_transform(codes[:m])
        panels.append((f"t-SNE ({m} points)", tsne, None if labels is None else labels[:m]))
    fig = Figure(figsize=(4.6 * len(panels) + (1.0 if labels is not None else 0), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    color = {}
    if labels is not None:  # one colour per class, centred on its tick
        k = int(labels.max()) + 1
        color = dict(cmap=colormaps["tab10" if k <= 10 else "viridis"].resampled(k),
                     vmin=-0.5, vmax=k - 0.5)
    for ax, (title, points, colors) in zip(axes, panels):
        scatter = ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7, linewidths=0,
                             c=colors, **(color if colors is not None else {}))
        ax.set_title(f"{title} of {codes.shape[1]}-D codes", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if labels is not None:
        k = int(labels.max()) + 1
        fig.colorbar(scatter, ax=list(axes), label="label", shrink=0.8,
                     ticks=range(k) if k <= 10 else None)
    return _finish(fig, path)


def kl_per_dim(kl, path=None, threshold: float = 0.01):
    """Bar chart of KL(q || p) per latent dimension (nats), sorted, with collapsed dimensions
    (KL below ``threshold``) in grey."""
    kl = np.asarray(kl, dtype=float)
    order = np.argsort(-kl)
    fig = Figure(figsize=(max(4, len(kl) * 0.15), 3.2))
    ax = fig.subplots()
    colors = ["tab:blue" if v >= threshold else "tab:gray" for v in kl[order]]
    ax.bar(np.arange(len(kl)), kl[order], color=colors)
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("KL (nats per datapoint)")
    ax.set_title(f"KL per dimension: {int((kl >= threshold).sum())} of {len(kl)} "
                 f"above {threshold:g} nats")
    ax.set_xticks(np.arange(len(kl))[:: max(1, math.ceil(len(kl) / 20))])
    ax.set_xticklabels(order[:: max(1, math.ceil(len(kl) / 20))], fontsize=7)
    return _finish(fig, path)


def _ellipse(ax, mean, cov, **kwargs):
    """The 2-standard-deviation ellipse of a 2-D Gaussian."""
    evals, evecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    pts = mean[:, None] + 2 * evecs @ (np.sqrt(np.maximum(evals, 0))[:, None] * circle)
    ax.plot(pts[0], pts[1], **kwargs)


def posterior_ellipses(q_mean, q_cov, p_mean, p_cov, dims=(0, 1), path=None):
    """2-sd ellipses of q(z | x) (dashed) and the exact p(z | x) (solid) in two latent
    dimensions, for a few datapoints. Means ``(n, q)``, covariances ``(n, q, q)`` or ``(q, q)``."""
    i, j = dims
    q_mean, p_mean = np.asarray(q_mean), np.asarray(p_mean)
    n = len(q_mean)
    q_cov = np.broadcast_to(np.asarray(q_cov), (n, *np.asarray(q_cov).shape[-2:]))
    p_cov = np.broadcast_to(np.asarray(p_cov), (n, *np.asarray(p_cov).shape[-2:]))
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for k in range(n):
        color = f"C{k % 10}"
        sel = np.ix_([i, j], [i, j])
        _ellipse(ax, p_mean[k, [i, j]], p_cov[k][sel], color=color, lw=2,
                 label="exact p(z|x)" if k == 0 else None)
        _ellipse(ax, q_mean[k, [i, j]], q_cov[k][sel], color=color, lw=1.5, ls="--",
                 label="guide q(z|x)" if k == 0 else None)
    ax.set_xlabel(f"z{i}")
    ax.set_ylabel(f"z{j}")
    ax.set_title("posterior 2-sd ellipses, one colour per datapoint")
    ax.legend()
    ax.set_aspect("equal", adjustable="datalim")
    return _finish(fig, path)


def posterior_forest(idata: dict, path=None):
    """ArviZ forest plot comparing posterior draws, e.g. ``{"guide": ..., "exact": ...}`` from
    :func:`pvae.inference.to_inference_data`."""
    import arviz as az  # slow to import: only when this figure is drawn

    fig = Figure(figsize=(6, 8))
    az.plot_forest(list(idata.values()), model_names=list(idata), var_names=["z"],
                   combined=True, hdi_prob=0.94, ax=fig.subplots())
    fig.suptitle("94% HDI of z per datapoint and dimension")
    return _finish(fig, path)


def posterior_pairs(reference, approx, *, dims=(0, 1), datapoint: int = 0, site: str = "z",
                    path=None):
    """ArviZ pair plot (``az.plot_pair``, scatter and marginal densities) of two coordinates of
    one latent site for one datapoint: reference draws (e.g. NUTS) and approximate draws (e.g.
    the guide) overlaid. ``reference`` and ``approx`` are
    :class:`pvae.inference.mcmc.PosteriorSamples`; ``dims`` index the site's flattened
    coordinates (``(latent_dim,)`` for a VAE's ``z``).

    :raises ValueError: ``site`` is not a site of both, or ``dims`` / ``datapoint`` out of range.
    """
    import arviz as az  # slow to import: only when this figure is drawn

    for s in (reference, approx):
        if site not in s.draws:
            raise ValueError(f"no draws of site {site!r}; the sites are {sorted(s.draws)}")
    width = math.prod(reference.draws[site].shape[3:])
    i, j = dims
    if not (0 <= i < width and 0 <= j < width and i != j):
        raise ValueError(f"dims must be two different coordinates in [0, {width}), got {dims}")
    if not 0 <= datapoint < reference.num_datapoints:
        raise ValueError(f"datapoint must be in [0, {reference.num_datapoints}), got {datapoint}")
    fig = Figure(figsize=(6, 6))
    axes = fig.subplots(2, 2)
    coords = {"datapoint": [datapoint], f"{site}_flat": [i, j]}
    handles = []
    # the approximation first, so that the reference's points lie on top
    for s, label, color in ((approx, approx.method, "C1"),
                            (reference, f"{reference.method} (reference)", "C0")):
        d = s.draws[site]
        idata = az.from_dict(posterior={site: d.reshape(*d.shape[:3], -1).numpy()},
                             dims={site: ["datapoint", f"{site}_flat"]})
        az.plot_pair(idata, var_names=[site], coords=coords, marginals=True, ax=axes,
                     scatter_kwargs={"color": color, "alpha": 0.25},
                     marginal_kwargs={"color": color})
        handles.append(Line2D([], [], color=color, marker="o", ls="-",
                              label=f"{label}: {s.num_chains} x {s.num_draws} draws"))
    axes[1, 0].set_xlabel(f"{site}[{i}]")
    axes[1, 0].set_ylabel(f"{site}[{j}]")
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.95, 0.85), fontsize=8)
    fig.suptitle(f"posterior of datapoint {datapoint}: {site}[{i}] and {site}[{j}]")
    return _finish(fig, path)


def gradient_variance(table: dict, path=None):
    """Bar chart (log scale) of gradient variance per parameter group for several estimators:
    ``table[estimator][group]["variance"]`` as returned by
    :func:`pvae.inference.gradient_variance`."""
    labels = list(table)
    groups = [g for g in next(iter(table.values())) if isinstance(table[labels[0]][g], dict)
              and g != "total"]
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    width = 0.8 / max(len(groups), 1)
    for i, g in enumerate(groups):
        ax.bar(np.arange(len(labels)) + i * width, [table[k][g]["variance"] for k in labels],
               width, label=g)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(labels)) + width * (len(groups) - 1) / 2)
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("gradient variance (trace)")
    ax.legend()
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Figures of a trained model (any built-in model with reconstruct / sample)


def reconstructions(model, x, image_shape, *, c=None, path=None):
    """Inputs ``x`` ``(n, D)`` (first row) and the model's reconstructions
    E[x | z = E_q[z | x, c]] (second row)."""
    return image_grid([x, model.reconstruct(x, c)], image_shape,
                      row_labels=["input", "reconstruction"], path=path)


def prior_samples(model, image_shape, *, num_rows: int = 8, num_cols: int = 10, generator=None,
                  path=None):
    """A grid of E[x | z] for z drawn from the prior."""
    samples = model.sample(num_rows * num_cols, generator=generator)
    return image_grid(list(samples.reshape(num_rows, num_cols, -1)), image_shape, path=path,
                      title="samples from the prior (E[x|z])")


def interpolations(model, x_a, x_b, image_shape, *, num_steps: int = 10, c=None, path=None):
    """Two rows per pair of inputs ``x_a[i]``, ``x_b[i]`` (each ``(n, D)``): the decoded linear
    and spherical paths between their posterior means (:func:`pvae.inference.interpolate`),
    reconstructions at both ends."""
    methods = ("linear", "spherical")
    paths = {m: interpolate(model, x_a, x_b, num_steps, m, c=c) for m in methods}
    rows = [paths[m][i] for i in range(len(x_a)) for m in methods]
    labels = [f"{i}: {m}" for i in range(len(x_a)) for m in methods]
    return image_grid(rows, image_shape, row_labels=labels, path=path,
                      title="latent interpolation between posterior means")


def traversals(model, x, image_shape, *, dims=None, num_steps: int = 9, span: float = 2.5,
               c=None, path=None):
    """One row per latent dimension j: E[x | z = E_q[z | x] + v e_j] for v in
    ``[-span, span]`` (:func:`pvae.inference.traverse`), for one input ``x`` ``(D,)``."""
    grid = traverse(model, x, dims, num_steps, span, c=c)
    dims = list(range(len(grid))) if dims is None else list(dims)
    return image_grid(list(grid), image_shape, row_labels=[f"z[{j}]" for j in dims], path=path,
                      title=f"latent traversals, offsets -{span:g}..{span:g}")


def class_grids(model, image_shape, *, num_styles: int = 6, per_class: int = 10,
                generator=None, paths=(None, None)):
    """The two grids of a class-conditional model (``num_classes`` labels): rows = one z
    (style) with the class varied along the columns, and rows = one class with z ~ p(z | c)
    varied along the columns. Returns both figures."""
    k, device, dtype = model.num_classes, model.device, model.dtype
    z = torch.randn(num_styles, model.latent_dim, generator=generator, device=device, dtype=dtype)
    classes = torch.arange(k, device=device)
    rows = [model.sample(k, c=classes, z=z[i].expand(k, -1)) for i in range(len(z))]
    style = image_grid(rows, image_shape, row_labels=[f"z #{i}" for i in range(len(z))],
                       path=paths[0], title="each row: one z, classes 0..9 (standard-prior z)")
    rows = [model.sample(per_class, c=torch.tensor(i, device=device), generator=generator)
            for i in range(k)]
    by_class = image_grid(rows, image_shape, row_labels=[f"class {i}" for i in range(k)],
                          path=paths[1], title="each row: one class, z ~ p(z | c)")
    return style, by_class


def inference_gap(gap, path=None, max_images: int = 50):
    """Per-image bars of the inference gap split into its approximation part (log p(x) -
    ELBO(q*)) and its amortization part (ELBO(q*) - ELBO(q_phi)), nats, for the first
    ``max_images`` images of a :class:`pvae.inference.InferenceGap`."""
    approx = gap.approximation_gap[:max_images].detach().cpu().double().numpy()
    amort = gap.amortization_gap[:max_images].detach().cpu().double().numpy()
    index = np.arange(len(approx))
    fig = Figure(figsize=(max(5, len(approx) * 0.18), 3.4))
    ax = fig.subplots()
    ax.bar(index, approx, color="tab:blue", label="approximation gap")
    ax.bar(index, amort, bottom=approx, color="tab:orange", label="amortization gap")
    ax.set_xlabel("test image")
    ax.set_ylabel("nats")
    s = gap.summary()
    ax.set_title(f"inference gap {s['total_gap']:.2f}: approximation {s['approximation_gap']:.2f}"
                 f" + amortization {s['amortization_gap']:.2f} (means)")
    ax.legend()
    return _finish(fig, path)
