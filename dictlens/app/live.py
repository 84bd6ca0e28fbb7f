"""Live encoding for the web app: run a text through the model and the SAE, report which
features fire on which tokens. Loads the model on first use; one request at a time."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from dictlens.analysis.search import TokenCodes, features_on_text
from dictlens.errors import InputError


class LiveEncoder:
    """The SAE of an analysis spliced onto its model's hook, for texts typed in the app.

    ``sae``/``lm`` may be given (tests, a Python session); otherwise they are loaded from
    the run and model recorded in the analysis the first time they are needed.
    """

    def __init__(self, meta: dict[str, Any], *, sae: Any = None, lm: Any = None, model: str | None = None,
                 device: str | None = None, max_tokens: int = 1024):
        self.meta, self.sae, self.lm = meta, sae, lm
        self.model_name = model or meta.get("model")
        self.device, self.max_tokens = device, max_tokens
        self.hook = meta["hook"]
        self.lock = threading.Lock()

    def load_sae(self) -> Any:
        """The analysis's SAE (loaded from its run directory the first time)."""
        from dictlens.load import load_sae

        if self.sae is None:
            run = self.meta.get("sae")
            if not run or not (Path(run) / "sae.safetensors").is_file():
                raise InputError(f"the SAE of this analysis ({run}) is not on disk; this page needs it")
            self.sae = load_sae(run)
        return self.sae

    def _load(self) -> None:
        from dictlens.data.models import load_model
        from dictlens.load import check_model, model_of

        sae = self.load_sae()
        if self.lm is None:
            run = self.meta.get("sae") or "this analysis"
            self.lm = load_model(model_of(sae, run, self.model_name), device=self.device)
            check_model(sae, run, self.lm, self.hook)
            self.sae = sae.to(self.lm.device)
        if self.sae.n_features != int(self.meta["n_features"]):
            raise InputError(f"the SAE has {self.sae.n_features} features, the analysis {self.meta['n_features']}")

    def steer(self, prompt: str, edits: list[Any], cfg: Any) -> Any:
        """The prompt continued with and without ``edits`` (:class:`dictlens.use.Edit`) in the
        SAE spliced at its hook (:func:`dictlens.use.steer.steered_generation`)."""
        from dictlens.use.steer import steered_generation

        with self.lock:
            self._load()
            return steered_generation(self.lm, {self.hook: self.sae}, {self.hook: edits}, prompt, cfg,
                                      max_norm=self.sae.provenance.outlier_limit)

    def encode(self, text: str, per_token: int = 8) -> tuple[list[TokenCodes], list[dict[str, Any]]]:
        """Per token its strongest features, and every feature ranked by its largest
        activation on the text (:func:`dictlens.analysis.search.features_on_text`)."""
        with self.lock:
            self._load()
            r = features_on_text(self.sae, self.lm, self.hook, text, per_token, self.max_tokens,
                                 max_norm=self.sae.provenance.outlier_limit)
        return r.tokens, r.features
