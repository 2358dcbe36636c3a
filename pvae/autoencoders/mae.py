"""The masked autoencoder (He et al. 2021) on square patches of small grayscale images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pvae.autoencoders.base import AutoencoderBase
from pvae.validation import check_count, check_float, check_sizes

__all__ = ["MaskedAutoencoder"]


class MaskedAutoencoder(AutoencoderBase):
    r"""A masked autoencoder (MAE): an image is cut into ``patch_size × patch_size`` patches,
    a random fraction ``mask_ratio`` of them is dropped, a transformer encoder
    (:class:`torch.nn.TransformerEncoder`) sees only the visible patches (linear patch
    embedding + learned positional embeddings), and a lightweight transformer decoder
    receives the encoded visible tokens plus a shared learned mask token at every dropped
    position (with its own positional embeddings) and predicts the pixels of every patch. The
    loss is the squared error on the **masked patches only**, summed over their pixels (He et
    al. 2021, sec. 3; without their per-patch pixel normalization).

    Exactly ``num_masked = round(mask_ratio · num_patches)`` patches are masked per image (a
    random permutation per image: the first ``num_patches − num_masked`` are kept).

    The code of an image (:meth:`encode`, for the linear probe) is the mean of the encoder's
    output tokens with no patch masked, ``(batch, embed_dim)``.

    :param image_shape: ``(height, width)``, each a multiple of ``patch_size``.
    :param int patch_size: side of a square patch (7: 16 patches of 49 pixels on 28×28).
    :param int embed_dim: encoder width (the code size).
    :param int depth: encoder layers.
    :param int num_heads: encoder attention heads (dividing ``embed_dim``).
    :param int decoder_dim: decoder width.
    :param int decoder_depth: decoder layers.
    :param int decoder_num_heads: decoder attention heads (dividing ``decoder_dim``).
    :param float mask_ratio: fraction of patches masked, in (0, 1), leaving at least one
        visible.
    :raises ValueError: sizes that do not fit together.

    References:
      1. K. He, X. Chen, S. Xie, Y. Li, P. Dollár, R. Girshick, Masked autoencoders are
         scalable vision learners, arXiv:2111.06377 (2021).
    """

    def __init__(self, image_shape: Sequence[int] = (28, 28), patch_size: int = 7,
                 embed_dim: int = 64, depth: int = 2, num_heads: int = 4,
                 decoder_dim: int = 32, decoder_depth: int = 1, decoder_num_heads: int = 4,
                 mask_ratio: float = 0.75):
        super().__init__()
        height, width = check_sizes("image_shape", image_shape)
        p = check_count("patch_size", patch_size)
        if height % p or width % p:
            raise ValueError(f"image_shape {(height, width)} must be multiples of "
                             f"patch_size={p}")
        for name, dim, heads in (("num_heads", embed_dim, num_heads),
                                 ("decoder_num_heads", decoder_dim, decoder_num_heads)):
            if check_count(name, heads) and dim % heads:
                raise ValueError(f"{name}={heads} must divide the width {dim}")
        self.image_shape, self.patch_size = (height, width), p
        self.grid = (height // p, width // p)
        self.num_patches, self.patch_dim = self.grid[0] * self.grid[1], p * p
        self.x_dim, self.code_dim = height * width, check_count("embed_dim", embed_dim)
        self.mask_ratio = check_float("mask_ratio", mask_ratio, minimum=0.0, maximum=1.0,
                                      strict=True)
        self.num_masked = round(self.mask_ratio * self.num_patches)
        if not 0 < self.num_masked < self.num_patches:
            raise ValueError(f"mask_ratio={mask_ratio} masks {self.num_masked} of "
                             f"{self.num_patches} patches; it must mask at least one and leave "
                             "one visible")
        n = self.num_patches
        self.patch_embed = nn.Linear(self.patch_dim, embed_dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n, embed_dim))
        self.encoder = nn.TransformerEncoder(_layer(embed_dim, num_heads),
                                             check_count("depth", depth),
                                             enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, check_count("decoder_dim", decoder_dim))
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(0.02 * torch.randn(1, n, decoder_dim))
        self.decoder = nn.TransformerEncoder(_layer(decoder_dim, decoder_num_heads),
                                             check_count("decoder_depth", decoder_depth),
                                             enable_nested_tensor=False)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, self.patch_dim)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, H·W) -> (batch, num_patches, patch_size²)``, patches in row-major order."""
        (gh, gw), p = self.grid, self.patch_size
        return (x.reshape(-1, gh, p, gw, p).permute(0, 1, 3, 2, 4)
                .reshape(-1, self.num_patches, self.patch_dim))

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        (gh, gw), p = self.grid, self.patch_size
        return patches.reshape(-1, gh, gw, p, p).permute(0, 1, 3, 2, 4).reshape(-1, self.x_dim)

    def random_masking(self, batch: int, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A random set of ``num_masked`` patches per image.

        :param noise: ``(batch, num_patches)`` uniforms deciding the order (the patches with
            the smallest stay visible); drawn from torch's generator if ``None``.
        :returns: ``(ids_keep, ids_restore, mask)``: visible patch indices ``(batch,
            num_visible)``, the permutation that restores patch order, and the boolean mask
            ``(batch, num_patches)``, True where a patch is masked.
        """
        if noise is None:
            noise = torch.rand(batch, self.num_patches, device=self.device, dtype=self.dtype)
        ids_shuffle = noise.argsort(-1)
        ids_restore = ids_shuffle.argsort(-1)
        num_visible = self.num_patches - self.num_masked
        mask = (ids_restore >= num_visible)
        return ids_shuffle[:, :num_visible], ids_restore, mask

    def _encode_tokens(self, patches: torch.Tensor, ids_keep: torch.Tensor | None
                       ) -> torch.Tensor:
        tokens = self.patch_embed(patches) + self.pos_embed
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = tokens.gather(1, index)
        return self.norm(self.encoder(tokens))

    def _decode_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        y = self.decoder_embed(latent)
        batch, num_visible, width = y.shape
        masks = self.mask_token.expand(batch, self.num_patches - num_visible, width)
        y = torch.cat([y, masks], 1)
        y = y.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, width))
        y = self.decoder_norm(self.decoder(y + self.decoder_pos_embed))
        return self.head(y)  # (batch, num_patches, patch_dim)

    def predict(self, x: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode the visible patches, decode every patch.

        :returns: ``(pred, mask)``: predicted patches ``(batch, num_patches, patch_size²)``
            and the mask ``(batch, num_patches)`` (True = masked).
        """
        ids_keep, ids_restore, mask = self.random_masking(x.shape[0], noise)
        latent = self._encode_tokens(self.patchify(x), ids_keep)
        return self._decode_tokens(latent, ids_restore), mask

    def masked_loss(self, x: torch.Tensor, target: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error on the masked patches, summed over their pixels: ``(batch,)``, and
        the mask ``(batch, num_patches)``.

        :param target: the images to predict (``x`` if ``None``).
        :param noise: see :meth:`random_masking`.
        """
        pred, mask = self.predict(x, noise)
        target = x if target is None else target
        err = (pred - self.patchify(target)).pow(2).sum(-1)
        return (err * mask.to(err.dtype)).sum(-1), mask

    def reconstruction_loss(self, x_in: torch.Tensor, target: torch.Tensor
                            ) -> tuple[torch.Tensor, None]:
        """:meth:`masked_loss` for the objective: ``(loss, None)`` (no code is penalized)."""
        return self.masked_loss(x_in, target)[0], None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The mean encoder token with every patch visible: ``(batch, H·W) -> (batch,
        embed_dim)``."""
        return self._encode_tokens(self.patchify(self._place(x)), None).mean(1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask ``mask_ratio`` of the patches and fill them in: the visible patches are the
        input's, the masked ones the decoder's prediction (as in He et al.'s figures).

        :returns: ``(image, mask)``: ``(batch, H·W)`` and ``(batch, num_patches)``.
        """
        x = self._place(x)
        pred, mask = self.predict(x, noise)
        patches = torch.where(mask.unsqueeze(-1), pred, self.patchify(x))
        return self.unpatchify(patches), mask

    def masked_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` with the masked patches set to 0 (for figures): ``(batch, H·W)``."""
        patches = self.patchify(self._place(x)).masked_fill(mask.unsqueeze(-1), 0.0)
        return self.unpatchify(patches)


def _layer(width: int, heads: int) -> nn.TransformerEncoderLayer:
    """A pre-norm transformer block (attention + MLP of twice the width, GELU, no dropout)."""
    return nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=True)
