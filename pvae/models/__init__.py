"""Built-in latent-variable models, each a ``torch.nn.Module`` with Pyro ``model``/``guide``."""

from pvae.models.base import LatentVariableModel
from pvae.models.cvae import CVAE
from pvae.models.likelihoods import LIKELIHOODS, make_likelihood
from pvae.models.ppca import PPCA
from pvae.models.vae import VAE

#: Models by the name used on the command line (``--model``).
MODELS = {"vae": VAE, "cvae": CVAE}

__all__ = ["CVAE", "LIKELIHOODS", "MODELS", "PPCA", "LatentVariableModel", "VAE", "make_likelihood"]
