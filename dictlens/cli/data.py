"""``dictlens hooks``, ``harvest``, ``info``: a model's hook points and activation caches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dictlens.cli.common import command, print_cache_summary
from dictlens.config import field
from dictlens.data.cache import HarvestConfig


@dataclass(kw_only=True)
class Hooks:
    """The named hook points of a model (and, with --modules, every module path)."""

    model: str = field(positional=True, help="hub id, model directory, .gguf file or smollm2-135m")
    modules: bool = field(False, help="also list every module path")


@dataclass(kw_only=True)
class Info:
    """What an activation cache holds; with --verify, every shard checked against its sha256."""

    cache: str = field(positional=True, help="cache directory")
    verify: bool = field(False, help="check every shard's sha256")


def _hooks(job: Hooks) -> int:
    from dictlens.data.hooks import named_hooks
    from dictlens.data.models import load_skeleton

    model = load_skeleton(job.model)  # structure only: no weights are loaded
    cfg = model.config
    print(f"{job.model}: {type(model).__name__}, {cfg.num_hidden_layers} blocks, width {cfg.hidden_size}")
    print(f"{'hook':<16} {'reads':<7} module")
    for name, point in named_hooks(model).items():
        print(f"{name:<16} {point.io:<7} {point.module}")
    if job.modules:
        print("\nmodule paths (append :input to read a module's input):")
        for name, _ in model.named_modules():
            if name:
                print(f"  {name}")
    else:
        print("\nAny module path is a hook too (`--modules` lists them); append :input for its input.")
    return 0


def _harvest(cfg: HarvestConfig) -> int:
    from dictlens.data.cache import harvest

    result = harvest(cfg)
    print_cache_summary(result.manifest, result.seconds, result.new_tokens)
    print(f"written to {result.path}")
    return 0


def _info(job: Info) -> int:
    from pathlib import Path

    from dictlens.data.cache import read_manifest, verify_file

    root = Path(job.cache)
    manifest = read_manifest(root)
    if job.verify:
        for shard in manifest["shards"]:
            for entry in shard["files"].values():
                verify_file(root, entry)
        print(f"verified {len(manifest['shards'])} shards: sizes and sha256 match the manifest")
    print_cache_summary(manifest)
    if not manifest["complete"]:
        print("incomplete: run the same harvest command again to resume")
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "hooks", "list the hook points of a model", Hooks, _hooks)
    command(sub, "harvest", "write an activation cache from a model and a text", HarvestConfig, _harvest)
    command(sub, "info", "summarise (and --verify) an activation cache", Info, _info)
