"""The SAE module, its config, activations and sparse kernels."""

from dictlens.sae.activations import Activation, Codes
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE

__all__ = ["SAE", "SAEConfig", "Codes", "Activation"]
