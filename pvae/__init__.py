"""pvae: probabilistic latent-variable models and variational inference on Pyro.

Models are Pyro programs (``model(x, c=None)``, ``guide(x, c=None)``) with amortized guides;
:mod:`pvae.inference` (objectives, evaluation) and :mod:`pvae.train` (the training engine,
``fit``) work on any object meeting that contract. ``ARCHITECTURE.md`` is the map.
"""

__version__ = "0.1.0"

from pvae import data, inference, models, train  # noqa: E402

__all__ = ["__version__", "data", "inference", "models", "train"]
