"""Network building blocks: MLPs, convolutional encoders and decoders, Gaussian heads."""

from pvae.nn.conv import ConvDecoder, ConvEncoder
from pvae.nn.heads import COVARIANCES, GaussianEncoder
from pvae.nn.mlp import ACTIVATIONS, MLP, activation_layer

__all__ = ["ACTIVATIONS", "COVARIANCES", "MLP", "ConvDecoder", "ConvEncoder", "GaussianEncoder",
           "activation_layer"]
