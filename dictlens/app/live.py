"""Live encoding for the web app: run a text through the model and the SAE, report which
features fire on which tokens. Loads the model on first use; one request at a time."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictlens.errors import InputError


@dataclass
class TokenCodes:
    """One token of the text: its text and its active features, strongest first."""

    text: str
    features: list[tuple[int, float]]


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
        from dictlens.sae.model import SAE

        if self.sae is None:
            run = self.meta.get("sae")
            if not run or not (Path(run) / "sae.safetensors").is_file():
                raise InputError(f"the SAE of this analysis ({run}) is not on disk; this page needs it")
            self.sae = SAE.load(run)
        return self.sae

    def _load(self) -> None:
        from dictlens.data.models import load_model

        self.load_sae()
        if self.lm is None:
            if not self.model_name:
                raise InputError("the analysis does not record its model; pass --model")
            self.lm = load_model(str(self.model_name), device=self.device)
        if self.sae.n_features != int(self.meta["n_features"]):
            raise InputError(f"the SAE has {self.sae.n_features} features, the analysis {self.meta['n_features']}")

    def tokenize(self, text: str) -> torch.Tensor:
        """[1, T] ids of ``text`` as the analysis saw text (BOS first when the tokenizer has one)."""
        from dictlens.data.packing import resolve_prepend_bos

        if not text.strip():
            raise InputError("the text is empty")
        tok = self.lm.tokenizer
        ids = tok(text, add_special_tokens=False).input_ids
        if resolve_prepend_bos(tok, "auto"):
            ids = [tok.bos_token_id, *ids]
        limit = min(self.max_tokens, int(getattr(self.lm.config, "max_position_embeddings", self.max_tokens)))
        if len(ids) > limit:
            raise InputError(f"the text is {len(ids):,} tokens long; at most {limit:,} fit in one context")
        return torch.tensor([ids])

    @torch.no_grad()
    def encode(self, text: str, per_token: int = 8) -> tuple[list[TokenCodes], list[dict[str, Any]]]:
        """Per token: the ``per_token`` strongest features; and every feature that fired,
        ranked by its largest activation on the text (with the token count)."""
        from dictlens.data.packing import special_token_ids
        from dictlens.data.tap import Tap

        with self.lock:
            self._load()
            ids = self.tokenize(text)
            acts = Tap(self.lm, [self.hook])(ids)[self.hook][0].float()
            with self.sae.ranking("float32"):
                codes = self.sae.encode(acts.to(self.sae.device)).cpu()
        special = special_token_ids(self.lm.tokenizer)
        tokens, best, fired = [], torch.zeros(codes.shape[1]), torch.zeros(codes.shape[1], dtype=torch.long)
        for t, i in enumerate(ids[0].tolist()):
            text_t = self.lm.tokenizer.decode([i], clean_up_tokenization_spaces=False)
            if i in special:  # BOS and friends are not analysed (their activations are outliers)
                continue
            row = codes[t]
            nz = row.nonzero()[:, 0]
            order = nz[row[nz].argsort(descending=True)]
            tokens.append(TokenCodes(text_t, [(int(f), float(row[f])) for f in order[:per_token]]))
            best = torch.maximum(best, row)
            fired += (row > 0).long()
        ranked = best.argsort(descending=True)
        summary = [{"id": int(f), "max": float(best[f]), "tokens": int(fired[f])} for f in ranked if best[f] > 0]
        return tokens, summary
