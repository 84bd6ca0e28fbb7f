"""The activation cache on disk: shards of raw arrays plus ``manifest.json``.

Layout of a cache directory::

    manifest.json              what the cache holds (see below); rewritten after every shard
    tokens/00000.npy           int64 [N, 3]: token id, position in context, context index
    <hook>/00000.npy           [N, D] activations of that hook for the same N tokens

Rows of every hook line up with the token table: row i of every file of shard s is the
same token. Files are ``.npy`` (memory-mappable, never pickled); bfloat16 is stored as its
raw uint16 bits. Each file is written under a temporary name and renamed when complete,
and the manifest records its size and sha256, so a truncated or altered shard is named,
never read. Only shards listed in the manifest exist as far as readers are concerned.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dictlens import __version__
from dictlens.config import check, field, to_dict
from dictlens.data.activations import Chunk, FilterState, NormStats, TokenFilter, iter_chunks
from dictlens.data.hooks import expand_hooks, named_hooks
from dictlens.data.models import DEFAULT_MODEL, LoadedModel, load_model
from dictlens.data.packing import (
    check_tokenizer,
    pack_contexts,
    resolve_prepend_bos,
    special_token_ids,
    tokenizer_fingerprint,
)
from dictlens.data.tap import Tap
from dictlens.data.text import DEFAULT_TEXT, iter_documents
from dictlens.errors import ActivationError, CacheError, ConfigError, InputError
from dictlens.io import atomic_write_bytes, atomic_write_json, npy_bytes, read_json, sha256_bytes, sha256_file

FORMAT = "dictlens-activations"
FORMAT_VERSION = 1
DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
# Fields that decide what the cache contains: a resume must use the same values.
CONTENT_FIELDS = ("model", "hooks", "text", "text_field", "context", "dtype", "keep_special",
                  "prepend_bos", "outlier_factor", "drop_nonfinite")


@dataclass
class HarvestConfig:
    """Everything ``dictlens harvest`` needs; saved in the cache manifest."""

    hooks: list[str] = field(help="hook point to record, e.g. resid_post.15, or a pattern such as 'resid_post.*'",
                             flag="--hook")
    out: str = field(help="cache directory to write (resumed if it holds a partial cache)")
    model: str = field(DEFAULT_MODEL, help="hub id, model directory, .gguf file or smollm2-135m")
    text: str = field(DEFAULT_TEXT, help="text source: file, folder, .jsonl, .parquet, dataset, - or default")
    text_field: str = field("text", help="field of .jsonl records / column of .parquet and datasets")
    tokens: int = field(100_000, help="activation rows (tokens) to record")
    context: int = field(128, help="tokens per context")
    batch_size: int = field(16, help="contexts per forward pass")
    dtype: str = field("float32", help="storage dtype: float32, float16 or bfloat16")
    shard_tokens: int = field(1 << 15, help="rows per shard file (about)")
    keep_special: bool = field(False, help="keep BOS, EOS, padding and other special tokens")
    prepend_bos: str = field("auto", help="start each context with BOS: auto, yes or no")
    outlier_factor: float | None = field(None, help="drop tokens whose norm exceeds this × the median norm")
    drop_nonfinite: bool = field(False, help="drop tokens with NaN/Inf activations instead of failing")
    device: str | None = field(None, help="cpu or cuda (default: cuda when present)")
    model_dtype: str | None = field(None, help="dtype to run the model in (default: float32 on CPU, bfloat16 on CUDA)")
    overwrite: bool = field(False, help="replace an existing cache in --out instead of resuming it")

    def __post_init__(self) -> None:
        check(self.dtype in DTYPES, "dtype", "float32, float16 or bfloat16", self.dtype)
        check(self.tokens > 0, "tokens", "a positive count", self.tokens)
        check(self.context >= 2, "context", "at least 2", self.context)
        check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        check(self.shard_tokens >= 1, "shard_tokens", "at least 1", self.shard_tokens)
        check(self.prepend_bos in ("auto", "yes", "no"), "prepend_bos", "auto, yes or no", self.prepend_bos)
        check(self.outlier_factor is None or self.outlier_factor > 1, "outlier_factor",
               "a factor above 1", self.outlier_factor)
        check(bool(self.hooks), "hooks", "at least one hook", self.hooks)



def hook_dirname(hook: str) -> str:
    """A file-system-safe folder name for a hook (module paths may hold ':')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", hook)


def to_storage(x: torch.Tensor, dtype: str, hook: str) -> np.ndarray:
    """float32 rows → the storage dtype, refusing values the dtype cannot hold."""
    if dtype == "float32":
        return x.numpy()
    y = x.to(getattr(torch, dtype))
    if not bool(torch.isfinite(y).all()):
        raise ActivationError(
            f"hook {hook}: activations up to |x| = {float(x.abs().max()):.4g} overflow {dtype}; "
            "use --dtype bfloat16 or float32")
    return y.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else y.numpy()


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows → a float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(arr).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / "manifest.json"
    if not file.is_file():
        raise CacheError(f"{path} is not an activation cache: no manifest.json")
    manifest = read_json(file)
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{file} is not a dictlens activation manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CacheError(f"{file} has format version {manifest['format_version']}; "
                         f"this dictlens reads up to {FORMAT_VERSION}: upgrade dictlens")
    return manifest


def verify_file(root: Path, entry: dict[str, Any], *, full: bool = True) -> None:
    """Check one shard file against its manifest entry (size, then sha256)."""
    path = root / entry["path"]
    if not path.is_file():
        raise CacheError(f"shard {path} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CacheError(f"shard {path} is truncated or altered: {size} bytes, manifest says {entry['bytes']}")
    if full and sha256_file(path) != entry["sha256"]:
        raise CacheError(f"shard {path} is altered: its sha256 does not match the manifest")


class CacheWriter:
    """Appends chunks to a cache directory, one atomically written shard at a time."""

    def __init__(self, root: Path, manifest: dict[str, Any], state: FilterState):
        self.root = root
        self.manifest = manifest
        self.state = state
        self.buffer: list[Chunk] = []
        self.buffered_rows = 0
        self.pending_contexts = 0

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"]) + self.buffered_rows

    @property
    def contexts_done(self) -> int:
        return int(self.manifest["contexts"])

    @classmethod
    def open(cls, cfg: HarvestConfig, lm: LoadedModel, widths: dict[str, int]) -> CacheWriter:
        root = Path(cfg.out)
        if (root / "manifest.json").is_file() and not cfg.overwrite:
            writer = cls._resume(root, cfg)
            check_tokenizer(writer.manifest, lm.tokenizer, cfg.model, root)
            return writer
        if root.exists() and any(root.iterdir()):
            if not (root / "manifest.json").is_file():
                raise InputError(f"output directory {root} is not empty and holds no activation cache; "
                                 "choose another --out")
            _clear_cache(root, read_manifest(root))
        root.mkdir(parents=True, exist_ok=True)
        content = {k: getattr(cfg, k) for k in CONTENT_FIELDS}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dictlens_version": __version__,
            "complete": False, "exhausted": False, **content,
            "prepend_bos_resolved": resolve_prepend_bos(lm.tokenizer, cfg.prepend_bos),
            "bos_token_id": lm.tokenizer.bos_token_id, "tokenizer": tokenizer_fingerprint(lm.tokenizer),
            "excluded_token_ids": [] if cfg.keep_special else sorted(special_token_ids(lm.tokenizer)),
            "model_class": type(lm.model).__name__, "n_layers": lm.n_layers,
            "widths": widths, "hook_dirs": {h: hook_dirname(h) for h in cfg.hooks},
            "tokens": 0, "contexts": 0, "shards": [], "stats": {}, "filter": {},
            "harvest_config": to_dict(cfg),
        }
        for h in cfg.hooks:
            (root / hook_dirname(h)).mkdir(exist_ok=True)
        (root / "tokens").mkdir(exist_ok=True)
        atomic_write_json(root / "manifest.json", manifest)
        return cls(root, manifest, FilterState(list(cfg.hooks), cfg.outlier_factor))

    @classmethod
    def _resume(cls, root: Path, cfg: HarvestConfig) -> CacheWriter:
        manifest = read_manifest(root)
        for key in CONTENT_FIELDS:
            if manifest.get(key) != getattr(cfg, key):
                raise CacheError(
                    f"{root} holds a cache with {key} = {manifest.get(key)!r}, but this run asks for "
                    f"{getattr(cfg, key)!r}; use another --out, or --overwrite to replace it")
        for shard in manifest["shards"]:
            for entry in shard["files"].values():
                verify_file(root, entry)
        for tmp in root.rglob(".*.tmp.*"):  # left by a run killed mid-write
            tmp.unlink()
        state = FilterState.from_json(list(cfg.hooks), manifest["filter"]) if manifest["filter"] \
            else FilterState(list(cfg.hooks), cfg.outlier_factor)
        return cls(root, manifest, state)

    def add(self, chunk: Chunk) -> None:
        self.buffer.append(chunk)
        self.buffered_rows += len(chunk)
        self.pending_contexts += chunk.n_contexts
        for h, a in chunk.acts.items():
            self.state.kept[h].add(a)

    def flush(self) -> None:
        """Write the buffered rows as one shard and record it in the manifest."""
        rows = self.buffered_rows
        if rows:
            index = len(self.manifest["shards"])
            table = np.stack([np.concatenate([c.token_ids for c in self.buffer]).astype(np.int64),
                              np.concatenate([c.positions for c in self.buffer]).astype(np.int64),
                              np.concatenate([c.contexts for c in self.buffer])], axis=1)
            files = {"tokens": self._write(f"tokens/{index:05d}.npy", table)}
            for h, d in self.manifest["hook_dirs"].items():
                x = torch.cat([c.acts[h] for c in self.buffer])
                files[h] = self._write(f"{d}/{index:05d}.npy", to_storage(x, self.manifest["dtype"], h))
            self.manifest["shards"].append({"index": index, "rows": rows, "files": files})
            self.manifest["tokens"] += rows
        self.manifest["contexts"] += self.pending_contexts
        self.manifest["filter"] = self.state.to_json()
        self.buffer, self.buffered_rows, self.pending_contexts = [], 0, 0
        atomic_write_json(self.root / "manifest.json", self.manifest)

    def _write(self, rel: str, arr: np.ndarray) -> dict[str, Any]:
        data = npy_bytes(arr)
        atomic_write_bytes(self.root / rel, data)
        return {"path": rel, "bytes": len(data), "sha256": sha256_bytes(data)}

    def finish(self, exhausted: bool) -> dict[str, Any]:
        self.flush()
        if self.manifest["tokens"] == 0:
            raise InputError("no tokens were kept: the text is too short, or every token was "
                             "filtered (special tokens, outliers, NaN/Inf)")
        self.manifest["stats"] = {h: NormStats.from_moments(m).to_json() for h, m in self.state.kept.items()}
        self.manifest["outlier_variance_share"] = {
            h: self.state.outlier_variance_share(h) for h in self.manifest["hooks"]}
        self.manifest["complete"] = True
        self.manifest["exhausted"] = exhausted
        atomic_write_json(self.root / "manifest.json", self.manifest)
        return self.manifest


def _clear_cache(root: Path, manifest: dict[str, Any]) -> None:
    """Remove the files of a dictlens cache (and only those) for --overwrite."""
    for shard in manifest.get("shards", []):
        for entry in shard["files"].values():
            (root / entry["path"]).unlink(missing_ok=True)
    (root / "manifest.json").unlink()


@dataclass
class HarvestResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float
    new_tokens: int


def harvest(cfg: HarvestConfig, lm: LoadedModel | None = None, *, progress: bool = True) -> HarvestResult:
    """Run the model over the text and write (or resume) an activation cache in ``cfg.out``."""
    from tqdm.auto import tqdm

    if lm is not None and lm.name != cfg.model:
        raise ConfigError(f"model: the config names {cfg.model!r} but the loaded model is {lm.name!r}")
    lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    if lm.max_context is not None and cfg.context > lm.max_context:
        raise ConfigError(f"context: {cfg.context} tokens is longer than {cfg.model} allows ({lm.max_context})")
    hooks = expand_hooks(list(cfg.hooks), list(named_hooks(lm.model)), where=lm.name)
    if hooks != list(cfg.hooks):  # patterns such as resid_post.* name the hooks they match
        cfg = dataclasses.replace(cfg, hooks=hooks)
    tap = Tap(lm, cfg.hooks)
    probe = tap(torch.zeros(1, 2, dtype=torch.long))  # widths, before anything is written
    writer = CacheWriter.open(cfg, lm, {h: int(a.shape[-1]) for h, a in probe.items()})
    start, t0 = writer.tokens, time.perf_counter()
    if writer.manifest["complete"] and (writer.tokens >= cfg.tokens or writer.manifest["exhausted"]):
        return HarvestResult(writer.root, writer.manifest, 0.0, 0)
    writer.manifest["complete"] = False
    contexts = pack_contexts(iter_documents(cfg.text, cfg.text_field), lm.tokenizer, cfg.context,
                             prepend_bos=writer.manifest["prepend_bos_resolved"])
    token_filter = TokenFilter(set(writer.manifest["excluded_token_ids"]), cfg.keep_special, cfg.drop_nonfinite)
    chunks = iter_chunks(tap, islice(contexts, writer.contexts_done, None), batch_size=cfg.batch_size,
                         token_filter=token_filter, state=writer.state, first_context=writer.contexts_done)
    exhausted = True
    with tqdm(total=cfg.tokens, initial=start, unit="tok", unit_scale=True, disable=not progress,
              desc=f"harvest {','.join(cfg.hooks)}") as bar:
        for chunk in chunks:
            chunk = chunk.head(cfg.tokens - writer.tokens)
            writer.add(chunk)
            bar.update(len(chunk))
            if writer.buffered_rows >= cfg.shard_tokens:
                writer.flush()
            if writer.tokens >= cfg.tokens:
                exhausted = False
                break
    manifest = writer.finish(exhausted)
    return HarvestResult(writer.root, manifest, time.perf_counter() - t0, manifest["tokens"] - start)
