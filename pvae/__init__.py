"""pvae: probabilistic latent-variable models and variational inference on Pyro.

Models are Pyro programs (``model(x, c=None)``, ``guide(x, c=None)``) with amortized guides;
:mod:`pvae.inference` trains and evaluates any object meeting that contract.
"""

__version__ = "0.1.0"

from pvae import data, inference, models  # noqa: E402

__all__ = ["__version__", "data", "inference", "models"]
