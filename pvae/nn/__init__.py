"""Network building blocks: MLPs and Gaussian heads (conv networks land here later)."""

from pvae.nn.heads import GaussianEncoder
from pvae.nn.mlp import ACTIVATIONS, MLP

__all__ = ["ACTIVATIONS", "MLP", "GaussianEncoder"]
