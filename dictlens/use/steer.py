"""Steered generation: the same prompt, the same seed, with and without feature edits.

``steered_generation(lm, sae, hook, prompt, edits)`` returns both continuations. Both are
sampled with the same generator seed, so every difference between them comes from the
edits (with ``temperature=0`` decoding is greedy and needs no seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dictlens.config import field
from dictlens.errors import ConfigError
from dictlens.use.splice import Edit, Splice

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE


@dataclass
class GenerateConfig:
    """How to continue a prompt."""

    max_new_tokens: int = field(40, help="tokens to generate")
    temperature: float = field(0.7, help="sampling temperature (0: greedy)")
    top_p: float = field(0.9, help="nucleus sampling: the smallest set of tokens with this much probability")
    seed: int = field(0, help="sampling seed, the same for both continuations")
    chat: bool = field(False, help="wrap the prompt in the model's chat template (instruct models)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: expected at least 1, found {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature: expected a finite number >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected a value in (0, 1], found {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed: expected an integer in [0, 2^63), found {self.seed}")


@dataclass
class Generation:
    prompt: str
    unsteered: str
    steered: str
    prompt_tokens: int
    edits: list[dict[str, Any]]


def prompt_ids(lm: LoadedModel, prompt: str, cfg: GenerateConfig) -> torch.Tensor:
    """[1, T] token ids of the prompt (BOS first where the model has one; chat template if
    asked); a prompt that leaves no room for ``max_new_tokens`` in the context is refused."""
    from dictlens.data.tokens import text_ids

    return text_ids(lm, prompt, new_tokens=cfg.max_new_tokens, chat=cfg.chat, what="prompt")


@torch.inference_mode()
def generate(lm: LoadedModel, ids: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """The new token ids [n] after ``ids`` [1, T], sampled with ``cfg.seed``."""
    pad = lm.tokenizer.pad_token_id
    if pad is None:
        pad = lm.tokenizer.eos_token_id
    sample = cfg.temperature > 0
    torch.manual_seed(cfg.seed)
    if lm.device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed)
    extra: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p} if sample else {}
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                            do_sample=sample, pad_token_id=pad, top_k=None, **extra)
    return out[0, ids.shape[1]:]


def steered_generation(lm: LoadedModel, saes: Mapping[str, SAE], edits: Mapping[str, Sequence[Edit]], prompt: str,
                       cfg: GenerateConfig | None = None, *, error_term: bool = True,
                       max_norm: float | Mapping[str, float | None] | None = None) -> Generation:
    """Continue ``prompt`` twice with the same seed: as the model is, and with ``edits``
    applied in the SAEs spliced at their hooks (``saes`` {hook: SAE})."""
    cfg = cfg or GenerateConfig()
    if not any(edits.values()):
        raise ConfigError("steer: give at least one edit (add, clamp, scale, zero or mean)")
    ids = prompt_ids(lm, prompt, cfg)
    splice = Splice(lm, saes, edits, error_term=error_term, max_norm=max_norm)
    plain = generate(lm, ids, cfg)
    with splice:
        steered = generate(lm, ids, cfg)

    def text(t: torch.Tensor) -> str:
        return str(lm.tokenizer.decode(t.tolist(), skip_special_tokens=True))

    return Generation(prompt, text(plain), text(steered), int(ids.shape[1]),
                      [{"hook": h, "feature": e.feature, "kind": e.kind, "value": e.value, "start": e.start}
                       for h, es in edits.items() for e in es])
