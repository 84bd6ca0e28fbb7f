"""Where a dictionary came from: one typed record, saved in ``config.json`` as ``provenance``.

Every consumer reads a dictionary's model, tokenizer, hooks, context, outlier limit and
normalisation from here, and :mod:`dictlens.load` checks them against a model or a cache
in one place. The trainer fills the record from its source's own description
(``source.provenance()``); a foreign format's reader fills it from that format's config.

``config.json`` files written before this record (dictlens 0.1: an untyped ``metadata``
dict) are converted on load by :meth:`Provenance.from_legacy`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dictlens import __version__
from dictlens.config import check, field, from_dict

# 1: the first typed record (replacing the ``metadata`` dict of dictlens 0.1)
FORMAT_VERSION = 1
NORMALIZATIONS = ("sqrt_d", "unit", "none")


@dataclass
class Provenance:
    """What a dictionary reads and reconstructs, and where its weights came from.

    An SAE reads and reconstructs one hook (``hook_in == hook_out``); a transcoder reads
    one and predicts another. ``outlier_limit``: the activation norm above which the
    training data dropped tokens (attention sinks and the like); consumers leave such
    positions alone, since the dictionary never saw them. None: no limit was applied, or
    none is known.
    """

    model: str | None = field(None, help="the model whose activations it was trained on (name or path)")
    tokenizer: dict[str, Any] | None = field(None, help="fingerprint of that model's tokenizer "
                                                        "(vocab_size, sha256), when known")
    hook_in: str | None = field(None, help="the hook it reads")
    hook_out: str | None = field(None, help="the hook it reconstructs (the same as hook_in for an SAE)")
    context: int | None = field(None, help="context length (tokens) of the training data")
    outlier_limit: float | None = field(None, help="norm above which the training data dropped activations")
    normalization: str = field("none", help="how training scaled the inputs: sqrt_d, unit or none")
    input_scale: float = field(1.0, help="the factor training multiplied inputs by; folded into the "
                                         "saved weights, which read raw activations")
    output_scale: float | None = field(None, help="a transcoder's: the factor training multiplied its target by "
                                                  "(folded too: the saved weights write raw activations)")
    source: str = field("dictlens", help="dictlens, or the foreign format the weights were read from")
    origin: str | None = field(None, help="where the weights came from: a path or hub id (foreign formats)")
    acts: str | None = field(None, help="the activation cache it was trained on")
    text: str | None = field(None, help="the text it was trained on, when streamed from the model")
    notes: dict[str, Any] = field(default_factory=dict, help="anything else a tool records (e.g. its sweep)")
    dictlens_version: str = field(__version__, help="the dictlens that wrote the record")
    format_version: int = field(FORMAT_VERSION, help="version of this record's layout")

    def __post_init__(self) -> None:
        check(self.normalization in NORMALIZATIONS, "provenance.normalization", " / ".join(NORMALIZATIONS),
              self.normalization)
        check(self.input_scale > 0, "provenance.input_scale", "a positive number", self.input_scale)
        check(self.format_version <= FORMAT_VERSION, "provenance.format_version",
              f"at most {FORMAT_VERSION} (written by a newer dictlens: upgrade)", self.format_version)

    @classmethod
    def of_sae(cls, model: str | None = None, hook: str | None = None, **fields: Any) -> Provenance:
        """The record of an SAE that reads and reconstructs ``hook`` of ``model``."""
        return cls(model=model, hook_in=hook, hook_out=hook, **fields)

    @property
    def hook(self) -> str | None:
        """The hook an SAE reads and reconstructs (None when they differ or are unknown)."""
        return self.hook_in if self.hook_in == self.hook_out else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "provenance") -> Provenance:
        return from_dict(cls, data, source=source)

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_legacy(cls, metadata: dict[str, Any], source: str = "metadata") -> Provenance:
        """The record of a ``config.json`` written by dictlens 0.1 (its ``metadata`` dict).

        Runs trained before the outlier limit was recorded name their training cache: the
        limit is read from its manifest while the cache is there (and is unknown after)."""
        hook = metadata.get("hook")
        limit = metadata.get("outlier_limit")
        if "outlier_limit" not in metadata and metadata.get("acts"):
            limit = _limit_from_cache(metadata["acts"], hook, source)
        known = {"model", "hook", "acts", "context", "outlier_limit", "text"}
        return cls(model=metadata.get("model"), hook_in=hook, hook_out=hook, context=metadata.get("context"),
                   outlier_limit=None if limit is None else float(limit), acts=metadata.get("acts"),
                   text=metadata.get("text"), dictlens_version="0.1.0", format_version=0,
                   notes={k: v for k, v in metadata.items() if k not in known})


def _limit_from_cache(acts: str, hook: str | None, source: str) -> float | None:
    from dictlens.data.activations import outlier_limit
    from dictlens.io import read_json

    manifest = Path(acts) / "manifest.json"
    if hook is None or not manifest.is_file():
        warnings.warn(f"{source}: the SAE's training cache {acts} is not here and the run predates recorded "
                      "outlier limits, so its limit is unknown: attention-sink positions will be encoded too",
                      stacklevel=3)
        return None
    return outlier_limit(read_json(manifest), hook)
