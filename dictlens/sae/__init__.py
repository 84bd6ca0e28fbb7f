"""The SAE module, its config, activations and sparse kernels."""

from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE, Codes

__all__ = ["SAE", "SAEConfig", "Codes"]
