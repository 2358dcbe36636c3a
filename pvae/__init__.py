"""pvae: probabilistic latent-variable models and variational inference on Pyro.

Models are Pyro programs (``model(x, c=None)``, ``guide(x, c=None)``) with amortized guides;
:mod:`pvae.inference` (objectives, evaluation) and :mod:`pvae.train` (the training engine,
``fit``) work on any object meeting that contract. ``ARCHITECTURE.md`` is the map.
"""

from pvae import data, inference, models, train
from pvae.runs import load_run
from pvae.versions import __version__  # the one place the version is written

__all__ = ["__version__", "data", "inference", "load_run", "models", "train"]
