"""dictlens: dictionary learning (sparse autoencoders) on the activations of neural networks."""

__version__ = "0.1.0"

from dictlens.data.cache import HarvestConfig, HarvestResult, harvest  # noqa: E402
from dictlens.data.hooks import HookPoint, named_hooks, resolve_hook  # noqa: E402
from dictlens.data.models import LoadedModel, load_model  # noqa: E402
from dictlens.data.store import ActivationStore, ArraySource, StreamingSource  # noqa: E402
from dictlens.data.tap import Tap  # noqa: E402
from dictlens.data.text import iter_documents  # noqa: E402
from dictlens.errors import DictlensError  # noqa: E402
from dictlens.eval.metrics import Metrics, evaluate  # noqa: E402
from dictlens.load import load_sae  # noqa: E402  (a dictlens run or any foreign format)
from dictlens.sae import SAE, SAEConfig  # noqa: E402

# `dictlens.train` stays the subpackage: use `from dictlens.train import train`.
from dictlens.train.config import TrainConfig  # noqa: E402
from dictlens.train.estimator import SAEEstimator  # noqa: E402
from dictlens.train.trainer import Trainer  # noqa: E402

__all__ = [
    "SAE", "ActivationStore", "ArraySource", "DictlensError", "HarvestConfig", "HarvestResult", "HookPoint",
    "LoadedModel", "Metrics", "SAEConfig", "SAEEstimator", "StreamingSource", "Tap", "TrainConfig", "Trainer",
    "evaluate", "harvest", "iter_documents", "load_model", "load_sae", "named_hooks", "resolve_hook",
]
