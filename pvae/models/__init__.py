"""Built-in latent-variable models, each a ``torch.nn.Module`` with Pyro ``model``/``guide``."""

from pvae.models.base import LatentVariableModel
from pvae.models.cvae import CVAE
from pvae.models.hvae import HierarchicalVAE
from pvae.models.likelihoods import LIKELIHOODS, make_likelihood
from pvae.models.ppca import PPCA
from pvae.models.vae import NETWORKS, VAE

#: Built-in models by name: ``--model`` on the command line and ``"model"`` in a run folder's
#: ``config.json`` (each rebuilt with ``MODELS[name].from_config(...)``).
MODELS = {"vae": VAE, "cvae": CVAE, "ppca": PPCA, "hvae": HierarchicalVAE}

__all__ = ["CVAE", "LIKELIHOODS", "MODELS", "NETWORKS", "PPCA", "HierarchicalVAE",
           "LatentVariableModel", "VAE", "make_likelihood"]
