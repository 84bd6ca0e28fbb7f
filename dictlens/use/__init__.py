"""Use the features: splice SAEs into a model, steer and clamp, ablate, monitor, attribute.

Every intervention goes through :class:`~dictlens.use.splice.Splice`, a context manager
over any Hugging Face causal LM; the CLI (``dictlens generate``, ``ablate``, ``monitor``,
``attribute``) and the web app's steering panel call these functions.
"""

from dictlens.load import Loaded, load_run
from dictlens.use.ablate import AblationResult, ablate
from dictlens.use.attribute import Attribution, Metric, attribute, make_metric
from dictlens.use.monitor import Event, Monitor, Watch, parse_watch
from dictlens.use.splice import Edit, Splice, parse_edit
from dictlens.use.steer import GenerateConfig, Generation, steered_generation

__all__ = ["AblationResult", "Attribution", "Edit", "Event", "GenerateConfig", "Generation", "Loaded", "Metric",
           "Monitor", "Splice", "Watch", "ablate", "attribute", "load_run", "make_metric", "parse_edit",
           "parse_watch", "steered_generation"]
