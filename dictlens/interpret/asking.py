"""What is asked of a chat model, and how its replies are read: the ``llm`` explainer and
the LLM judge (:class:`~dictlens.interpret.scores.Judge`).

Tokens where the feature fires (or that a fuzzing item highlights) are marked ``<<like
this>>``; a context is shown as its text, or for simulation one numbered token a line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dictlens.interpret.llm import Chat, LLMConfig, LLMError, Messages, Prompt, pmap, prompt
from dictlens.interpret.patterns import Window
from dictlens.interpret.store import Explanation

MAX_EXAMPLES = 12        # examples shown to the explainer
MAX_EXPLANATION = 300    # characters kept of a reply


def marked(texts: Sequence[str], marks: Sequence[int] | set[int]) -> str:
    """The text with the tokens at ``marks`` wrapped in << >> (a token's leading space stays outside)."""
    keep = set(marks)
    out = []
    for i, t in enumerate(texts):
        if i in keep:
            lead = t[:len(t) - len(t.lstrip())]
            out.append(f"{lead}<<{t.lstrip()}>>")
        else:
            out.append(t)
    return "".join(out).replace("\n", "\\n")


def explain_messages(windows: Sequence[Window], p: Prompt | None = None) -> Messages:
    """The explainer's request for a feature's example ``windows`` (the strongest first)."""
    p = p or prompt("explain")
    ranked = sorted(windows, key=lambda w: -max(w.acts, default=0.0))[:MAX_EXAMPLES]
    lines = [f"{i + 1}. {marked(w.texts, [j for j, a in enumerate(w.acts) if a > 0])}" for i, w in enumerate(ranked)]
    return p.messages(examples="\n".join(lines))


def read_explanation(reply: str) -> str:
    """The explanation in a reply: what follows the last "Explanation:", else its first
    line; refused when empty."""
    found = re.findall(r"explanation\s*:\s*(.+)", reply, flags=re.I)
    text = found[-1] if found else next((line for line in reply.splitlines() if line.strip()), "")
    text = text.strip().strip("\"'`*").strip()
    if not text:
        raise LLMError(f"no explanation in the reply {reply[:80]!r}")
    return text[:MAX_EXPLANATION]


def explain_llm(chat: Chat, windows: Sequence[Window], cfg: LLMConfig) -> tuple[str, dict[str, Any]]:
    """An explanation of the feature of ``windows`` and the settings that made it."""
    p = prompt("explain")
    reply = chat.complete(explain_messages(windows, p), temperature=cfg.temperature, seed=cfg.llm_seed,
                          max_tokens=cfg.max_tokens)
    return read_explanation(reply), {"prompt": p.id, "temperature": cfg.temperature, "seed": cfg.llm_seed,
                                     "max_tokens": cfg.max_tokens, "backend": chat.name}


_ACT = re.compile(r"^\D*?(\d+)\s*[:=\-–]\s*(\d+(?:\.\d+)?)", re.M)


def read_activations(reply: str, n: int) -> list[float]:
    """Per-token activations (0–1) from "index: 0–10" lines; tokens not named are 0."""
    out = [0.0] * n
    for i, v in _ACT.findall(reply):
        if 0 <= int(i) < n:
            out[int(i)] = min(max(float(v), 0.0), 10.0) / 10.0
    return out


class LLMJudge:
    """A chat model judges: yes/no probabilities for detection and fuzzing, 0–10 per token for simulation."""

    def __init__(self, chat: Chat, cfg: LLMConfig):
        self.chat, self.cfg = chat, cfg
        self.name = f"llm:{chat.model}"
        self.prompts = {k: prompt(k) for k in ("detect", "fuzz", "simulate")}

    @property
    def settings(self) -> dict[str, Any]:
        return {"prompts": [p.id for p in self.prompts.values()], "backend": self.chat.name,
                "seed": self.cfg.llm_seed}

    def _all(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        got = pmap(fn, items, self.chat.parallel)
        for g in got:
            if isinstance(g, LLMError):
                raise g
        return got

    def detect(self, explanation: Explanation, contexts: Sequence[Window]) -> list[float]:
        p = self.prompts["detect"]
        return self._all(lambda c: self.chat.yes(p.messages(explanation=explanation.text, text=marked(c.texts, ())),
                                                 seed=self.cfg.llm_seed), contexts)

    def fuzz(self, explanation: Explanation, items: Sequence[tuple[Window, Sequence[int]]]) -> list[float]:
        p = self.prompts["fuzz"]
        return self._all(lambda it: self.chat.yes(p.messages(explanation=explanation.text,
                                                             text=marked(it[0].texts, it[1])),
                                                  seed=self.cfg.llm_seed), items)

    def simulate(self, explanation: Explanation, contexts: Sequence[Window]) -> list[list[float]]:
        p = self.prompts["simulate"]

        def one(c: Window) -> list[float]:
            tokens = "\n".join(f"{i}\t{t!r}" for i, t in enumerate(c.texts))
            reply = self.chat.complete(p.messages(explanation=explanation.text, tokens=tokens),
                                       temperature=0.0, seed=self.cfg.llm_seed,
                                       max_tokens=max(self.cfg.max_tokens, 6 * len(c.texts)))
            return read_activations(reply, len(c.texts))

        return self._all(one, contexts)
