"""Live encoding for the web app: run a text through the model and the SAE, report which
features fire on which tokens. Loads the model on first use; one request at a time."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.analysis.search import TokenCodes, features_on_text
from dictlens.errors import InputError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE
    from dictlens.use.splice import Edit
    from dictlens.use.steer import GenerateConfig, Generation


class LiveEncoder:
    """The SAE of an analysis spliced onto its model's hook, for texts typed in the app.

    ``sae``/``lm`` may be given (tests, a Python session); otherwise they are loaded from
    the run and model recorded in the analysis the first time they are needed.
    """

    def __init__(self, meta: dict[str, Any], *, sae: SAE | None = None, lm: LoadedModel | None = None,
                 model: str | None = None, device: str | None = None, max_tokens: int = 1024):
        self.meta, self.sae, self.lm = meta, sae, lm
        self.model_name = model or meta.get("model")
        self.device, self.max_tokens = device, max_tokens
        self.hook = meta["hook"]
        self.lock = threading.Lock()

    def load_sae(self) -> SAE:
        """The analysis's SAE (loaded from its run directory the first time)."""
        from dictlens.load import load_sae

        if self.sae is None:
            run = self.meta.get("sae")
            if not run or not (str(run).startswith("hf://") or Path(run).exists()):   # a run or any format
                raise InputError(f"the SAE of this analysis ({run}) is not on disk; this page needs it")
            self.sae = load_sae(run)
        return self.sae

    def _load(self) -> tuple[SAE, LoadedModel]:
        from dictlens.data.models import load_model
        from dictlens.load import check_model, model_of

        sae = self.load_sae()
        if self.lm is None:
            run = self.meta.get("sae") or "this analysis"
            self.lm = load_model(model_of(sae, run, self.model_name), device=self.device)
            check_model(sae, run, self.lm, self.hook)
            self.sae = sae = sae.to(self.lm.device)
        if sae.n_features != int(self.meta["n_features"]):
            raise InputError(f"the SAE has {sae.n_features} features, the analysis {self.meta['n_features']}")
        return sae, self.lm

    def steer(self, prompt: str, edits: list[Edit], cfg: GenerateConfig) -> Generation:
        """The prompt continued with and without ``edits`` (:class:`dictlens.use.Edit`) in the
        SAE spliced at its hook (:func:`dictlens.use.steer.steered_generation`)."""
        from dictlens.use.steer import steered_generation

        with self.lock:
            sae, lm = self._load()
            return steered_generation(lm, {self.hook: sae}, {self.hook: edits}, prompt, cfg,
                                      max_norm=sae.provenance.outlier_limit)

    def encode(self, text: str, per_token: int = 8) -> tuple[list[TokenCodes], list[dict[str, Any]]]:
        """Per token its strongest features, and every feature ranked by its largest
        activation on the text (:func:`dictlens.analysis.search.features_on_text`)."""
        with self.lock:
            sae, lm = self._load()
            r = features_on_text(sae, lm, self.hook, text, per_token, self.max_tokens,
                                 max_norm=sae.provenance.outlier_limit)
        return r.tokens, r.features
