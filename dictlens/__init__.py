"""dictlens: dictionary learning (sparse autoencoders) on the activations of neural networks."""

__version__ = "0.1.0"

from dictlens.data.cache import HarvestConfig, HarvestResult, harvest  # noqa: E402
from dictlens.data.hooks import HookPoint, named_hooks, resolve_hook  # noqa: E402
from dictlens.data.models import LoadedModel, load_model  # noqa: E402
from dictlens.data.store import ActivationStore, ArraySource, StreamingSource  # noqa: E402
from dictlens.data.tap import Tap  # noqa: E402
from dictlens.data.text import iter_documents  # noqa: E402
from dictlens.errors import DictlensError  # noqa: E402

__all__ = [
    "ActivationStore", "ArraySource", "DictlensError", "HarvestConfig", "HarvestResult", "HookPoint",
    "LoadedModel", "StreamingSource", "Tap", "harvest", "iter_documents", "load_model",
    "named_hooks", "resolve_hook",
]
