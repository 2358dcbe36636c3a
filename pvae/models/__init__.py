"""Built-in latent-variable models, each a ``torch.nn.Module`` with Pyro ``model``/``guide``, and
what needs more of a model than the contract: the comparison with an exact posterior (PPCA)
and walks through the latent space of models with ``encode``/``decode``."""

from pvae.models.base import LatentVariableModel
from pvae.models.cvae import CVAE
from pvae.models.hvae import HierarchicalVAE
from pvae.models.latent import INTERPOLATIONS, interpolate, latent_path, traverse
from pvae.models.likelihoods import LIKELIHOODS, make_likelihood
from pvae.models.posterior import PosteriorComparison, compare_posteriors, to_inference_data
from pvae.models.ppca import PPCA
from pvae.models.vae import NETWORKS, VAE

#: Built-in models by name: ``--model`` on the command line and ``"model"`` in a run folder's
#: ``config.json`` (each rebuilt with ``MODELS[name].from_config(...)``).
MODELS = {"vae": VAE, "cvae": CVAE, "ppca": PPCA, "hvae": HierarchicalVAE}

__all__ = ["CVAE", "INTERPOLATIONS", "LIKELIHOODS", "MODELS", "NETWORKS", "PPCA",
           "HierarchicalVAE", "LatentVariableModel", "PosteriorComparison", "VAE",
           "compare_posteriors", "interpolate", "latent_path", "make_likelihood",
           "to_inference_data", "traverse"]
