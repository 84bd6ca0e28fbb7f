"""Chat models for explaining and judging: an OpenAI-compatible endpoint or a local model.

- :class:`HTTPChat` speaks the ``/chat/completions`` protocol that vLLM, llama.cpp's
  server, Ollama and the hosted APIs share; the key comes from an environment variable.
  A request that fails (connection refused, time-out, 429 or 5xx, a malformed body) is
  retried with exponential backoff (``Retry-After`` honoured), then raised as
  :class:`LLMError`, which the jobs report per feature.
- :class:`LocalChat` runs a ``transformers`` model in this process (the embedded
  SmolLM2 works offline).
- :class:`Cached` puts any backend behind a disk cache keyed by the hash of the request
  (backend, model, messages, temperature, seed, token limit): a repeated or resumed run
  asks nothing twice.

Both answer two kinds of request: :meth:`complete` (a reply) and :meth:`yes` (the
probability that the reply is "yes" rather than "no", from the next-token distribution:
log-probabilities over HTTP, logits locally; a plain reply counts 1 or 0 where an endpoint
gives no log-probabilities).

Prompts are versioned files in ``prompts/`` (``NAME-vN.txt``, a ``### system`` and a
``### user`` part with ``$placeholders``); :func:`prompt` loads the newest version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dictlens.config import check, field
from dictlens.errors import ConfigError, DictlensError
from dictlens.io import atomic_write_json

PROMPTS = Path(__file__).with_name("prompts")
Messages = list[dict[str, str]]
T = TypeVar("T")
R = TypeVar("R")


class LLMError(DictlensError):
    """A chat model could not answer (after retries), or answered what cannot be read."""


@dataclass(frozen=True)
class Prompt:
    """One versioned prompt: ``name-vN`` and the hash of its text (recorded with every result)."""

    name: str
    version: int
    system: str
    user: str

    @property
    def id(self) -> str:
        digest = hashlib.sha256((self.system + "\0" + self.user).encode()).hexdigest()[:8]
        return f"{self.name}-v{self.version}@{digest}"

    def messages(self, **values: str) -> Messages:
        try:
            user = string.Template(self.user).substitute(values)
        except KeyError as e:
            raise ConfigError(f"prompt {self.name}-v{self.version} needs ${e.args[0]}") from None
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def prompt(name: str, version: int | None = None, directory: Path = PROMPTS) -> Prompt:
    """The prompt ``name`` (newest version unless ``version``) from ``directory``."""
    found = {int(m.group(1)): p for p in directory.glob(f"{name}-v*.txt")
             if (m := re.fullmatch(rf"{re.escape(name)}-v(\d+)\.txt", p.name))}
    if not found:
        raise ConfigError(f"no prompt {name!r} in {directory}")
    v = max(found) if version is None else version
    if v not in found:
        raise ConfigError(f"prompt {name!r} has versions {sorted(found)}, not {v}")
    text = found[v].read_text()
    parts = re.split(r"^### (system|user)\s*$", text, flags=re.M)
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}
    if set(sections) != {"system", "user"}:
        raise ConfigError(f"{found[v]}: a prompt file has a '### system' and a '### user' part")
    return Prompt(name, v, sections["system"], sections["user"])


@dataclass
class LLMConfig:
    """Which chat model explains or judges, and how it is asked."""

    llm_url: str | None = field(None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 "
                                           "(vLLM, llama.cpp server, Ollama, a hosted API)")
    llm_model: str | None = field(None, help="model name the endpoint serves")
    llm_key_env: str = field("OPENAI_API_KEY", help="environment variable that holds the endpoint's key")
    llm_local: str | None = field(None, help="a local transformers model instead, e.g. smollm2-135m")
    llm_device: str | None = field(None, help="cpu or cuda for --llm-local")
    temperature: float = field(0.0, help="sampling temperature (0: greedy)")
    llm_seed: int = field(0, help="seed sent with each request")
    max_tokens: int = field(120, help="reply length limit, in tokens")
    llm_parallel: int = field(4, help="requests in flight at once (endpoint)")
    retries: int = field(5, help="retries of a failed request before it is reported")
    llm_timeout: float = field(120.0, help="seconds to wait for one reply")
    price_in: float | None = field(None, help="dollars per million prompt tokens, for the cost estimate")
    price_out: float | None = field(None, help="dollars per million reply tokens, for the cost estimate")
    llm_cache: str | None = field(None, help="reply cache folder (default: ANALYSIS/llm-cache)")

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "temperature", "zero or more", self.temperature)
        check(self.max_tokens >= 1, "max_tokens", "at least 1", self.max_tokens)
        check(self.llm_parallel >= 1, "llm_parallel", "at least 1", self.llm_parallel)
        check(self.retries >= 0, "retries", "zero or more", self.retries)
        if self.llm_url is not None and self.llm_local is not None:
            raise ConfigError("give one of --llm-url or --llm-local, not both")
        if self.llm_url is not None and not self.llm_model:
            raise ConfigError("--llm-url needs --llm-model, the name of the model it serves")

    @property
    def given(self) -> bool:
        return self.llm_url is not None or self.llm_local is not None

    @property
    def hosted(self) -> bool:
        return self.llm_url is not None


class Chat(Protocol):
    """A chat model: ``name`` identifies backend and model (in cache keys and records)."""

    name: str
    model: str
    parallel: int

    def complete(self, messages: Messages, *, temperature: float, seed: int, max_tokens: int) -> str: ...

    def yes(self, messages: Messages, *, seed: int) -> float: ...


def _is_yes(text: str) -> float | None:
    word = re.match(r"\W*(\w+)", text.lower())
    if word is None:
        return None
    return 1.0 if word.group(1) in ("yes", "y", "true") else 0.0 if word.group(1) in ("no", "n", "false") else None


class HTTPChat:
    """An OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, url: str, model: str, *, key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retries: int = 5, parallel: int = 4, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/")
        if not re.match(r"https?://", self.url):
            raise ConfigError(f"--llm-url must start with http:// or https://, not {url!r}")
        self.model, self.key = model, os.environ.get(key_env)
        self.name = f"http:{self.url}#{model}"
        self.timeout, self.retries, self.parallel, self.backoff, self.sleep = timeout, retries, parallel, backoff, sleep
        self.requests = 0

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(60.0, self.backoff * 2 ** attempt)
            try:
                self.requests += 1
                req = urllib.request.Request(self.url + "/chat/completions", data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    reply = json.loads(r.read().decode())
                if not isinstance(reply, dict) or not reply.get("choices"):
                    raise ValueError(f"no choices in the reply: {str(reply)[:120]}")
                return reply
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    detail = e.read().decode(errors="replace")[:200]
                    raise LLMError(f"{self.url}: {last}: {detail}") from None
                after = e.headers.get("Retry-After") if e.headers else None
                if after and after.replace(".", "", 1).isdigit():
                    wait = min(120.0, float(after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:      # malformed JSON or an unexpected body
                last = f"malformed reply ({e})"
            if attempt < self.retries:
                self.sleep(wait)
        raise LLMError(f"{self.url}: no answer after {self.retries + 1} tries (last: {last})")

    def complete(self, messages: Messages, *, temperature: float, seed: int, max_tokens: int) -> str:
        reply = self._post({"model": self.model, "messages": messages, "temperature": temperature, "seed": seed,
                            "max_tokens": max_tokens})
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url}: a reply without choices[0].message.content") from None

    def yes(self, messages: Messages, *, seed: int) -> float:
        reply = self._post({"model": self.model, "messages": messages, "temperature": 0.0, "seed": seed,
                            "max_tokens": 1, "logprobs": True, "top_logprobs": 20})
        choice = reply["choices"][0]
        tops = (((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs")) or []
        p = {"yes": 0.0, "no": 0.0}
        for t in tops:
            word = str(t.get("token", "")).strip().lower()
            if word in p and isinstance(t.get("logprob"), int | float):
                p[word] += math.exp(float(t["logprob"]))
        if p["yes"] + p["no"] > 0:
            return p["yes"] / (p["yes"] + p["no"])
        answer = _is_yes(str((choice.get("message") or {}).get("content") or ""))
        if answer is None:
            raise LLMError(f"{self.url}: neither yes nor no in the reply")
        return answer


@functools.lru_cache(maxsize=2)
def _load_local(model: str, device: str | None) -> Any:
    """One loaded copy of a local chat model per process (the explainer and the judge share it)."""
    from dictlens.data.models import load_model

    return load_model(model, device=device)


class LocalChat:
    """A local ``transformers`` chat model (a name :func:`dictlens.data.models.load_model` takes)."""

    parallel = 1

    def __init__(self, model: str, *, device: str | None = None):
        self.model, self.device = model, device
        self.name = f"local:{model}"
        self._lock = threading.Lock()

    @property
    def lm(self) -> Any:
        """The model, loaded on the first request (a run answered from the cache loads nothing)."""
        return _load_local(self.model, self.device)

    @functools.cached_property
    def _yes(self) -> list[int]:
        return self._ids(self.lm.tokenizer, ("yes", "Yes", " yes", " Yes", "YES"))

    @functools.cached_property
    def _no(self) -> list[int]:
        return self._ids(self.lm.tokenizer, ("no", "No", " no", " No", "NO"))

    @staticmethod
    def _ids(tok: Any, words: Iterable[str]) -> list[int]:
        ids = {tok(w, add_special_tokens=False).input_ids[0] for w in words}
        return sorted(ids)

    def _ids_of(self, messages: Messages) -> Any:
        import torch

        from dictlens.data.tokens import chat_ids

        return torch.tensor([chat_ids(self.lm, messages)], device=self.lm.device)

    def complete(self, messages: Messages, *, temperature: float, seed: int, max_tokens: int) -> str:
        import torch

        ids = self._ids_of(messages)
        with self._lock, torch.no_grad():
            torch.manual_seed(seed)
            kwargs: dict[str, Any] = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            out = self.lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                         pad_token_id=self.lm.tokenizer.eos_token_id, **kwargs)
        return str(self.lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    def yes(self, messages: Messages, *, seed: int) -> float:
        import torch

        ids = self._ids_of(messages)
        with self._lock, torch.no_grad():
            probs = self.lm.model(ids).logits[0, -1].float().softmax(-1)
        y, n = float(probs[self._yes].sum()), float(probs[self._no].sum())
        return y / (y + n) if y + n > 0 else 0.5


class Cached:
    """``backend`` behind a disk cache of its replies, keyed by the request's hash."""

    def __init__(self, backend: Chat, directory: str | Path):
        self.backend, self.dir = backend, Path(directory)
        self.name, self.model, self.parallel = backend.name, backend.model, backend.parallel
        self.hits = self.misses = 0

    def _key(self, request: dict[str, Any]) -> Path:
        h = hashlib.sha256(json.dumps({"backend": self.name, **request}, sort_keys=True).encode()).hexdigest()
        return self.dir / h[:2] / f"{h}.json"

    def _cached(self, request: dict[str, Any], ask: Callable[[], Any]) -> Any:
        path = self._key(request)
        if path.is_file():
            try:
                value = json.loads(path.read_text())["reply"]
                self.hits += 1
                return value
            except (ValueError, KeyError):
                pass                                   # a damaged entry is asked again
        value = ask()
        self.misses += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"backend": self.name, "request": request, "reply": value})
        return value

    def complete(self, messages: Messages, *, temperature: float, seed: int, max_tokens: int) -> str:
        req = {"op": "complete", "messages": messages, "temperature": temperature, "seed": seed,
               "max_tokens": max_tokens}
        return str(self._cached(req, lambda: self.backend.complete(messages, temperature=temperature, seed=seed,
                                                                    max_tokens=max_tokens)))

    def yes(self, messages: Messages, *, seed: int) -> float:
        req = {"op": "yes", "messages": messages, "seed": seed}
        return float(self._cached(req, lambda: self.backend.yes(messages, seed=seed)))


def open_chat(cfg: LLMConfig, cache: str | Path | None) -> Cached:
    """The backend ``cfg`` names, behind its disk cache (``cfg.llm_cache`` or ``cache``)."""
    backend: Chat
    if cfg.llm_url is not None:
        backend = HTTPChat(cfg.llm_url, str(cfg.llm_model), key_env=cfg.llm_key_env, timeout=cfg.llm_timeout,
                           retries=cfg.retries, parallel=cfg.llm_parallel)
    elif cfg.llm_local is not None:
        backend = LocalChat(cfg.llm_local, device=cfg.llm_device)
    else:
        raise ConfigError("an LLM explainer or judge needs --llm-url (with --llm-model) or --llm-local MODEL")
    where = cfg.llm_cache or cache
    if where is None:
        raise ConfigError("--llm-cache: where to keep the replies")
    return Cached(backend, where)


def pmap(fn: Callable[[T], R], items: Sequence[T], parallel: int,
         done: Callable[[T, R | LLMError], None] | None = None) -> list[R | LLMError]:
    """``fn`` over ``items``, ``parallel`` at a time; results in order. An
    :class:`LLMError` is returned in its item's place instead of stopping the others;
    ``done(item, result)`` is called in this thread as each one finishes (to save it)."""
    def safe(x: T) -> R | LLMError:
        try:
            return fn(x)
        except LLMError as e:
            return e

    out: list[R | LLMError | None] = [None] * len(items)
    if parallel <= 1 or len(items) <= 1:
        for i, x in enumerate(items):
            out[i] = r = safe(x)
            if done is not None:
                done(x, r)
        return out  # type: ignore[return-value]
    with ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(safe, x): i for i, x in enumerate(items)}
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = r = fut.result()
            if done is not None:
                done(items[i], r)
    return out  # type: ignore[return-value]


def estimate(requests: Sequence[Messages], max_tokens: int, cfg: LLMConfig) -> str:
    """A line with the requests' count, their approximate token counts (4 characters a
    token) and, with prices, their cost."""
    tokens_in = sum(len(m["content"]) for msgs in requests for m in msgs) / 4
    tokens_out = len(requests) * max_tokens
    line = f"{len(requests):,} requests, about {tokens_in:,.0f} prompt tokens and at most {tokens_out:,} reply tokens"
    if cfg.price_in is not None or cfg.price_out is not None:
        cost = (tokens_in * (cfg.price_in or 0) + tokens_out * (cfg.price_out or 0)) / 1e6
        line += f": at most ${cost:,.2f}"
    return line
