"""The one loader: a dictionary run, checked against the model and the cache it is used with.

Every command that takes a run (eval, analyze, search, serve, generate, ablate, monitor,
attribute, compare) loads it here, so a dictionary is refused the same way everywhere:
another model (by name, then by tokenizer fingerprint), another hook, another width, a
cache harvested from something else. What is known comes from the run's
:class:`~dictlens.provenance.Provenance`; nothing is re-derived by a consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dictlens.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dictlens.data.hooks import Wiring
    from dictlens.data.models import LoadedModel
    from dictlens.data.store import ActivationStore
    from dictlens.formats.base import ReadOptions
    from dictlens.sae.clt import Dictionary
    from dictlens.sae.model import SAE


@dataclass
class Loaded:
    """A trained SAE, its hook, and the model it reads (``max_norm``: the outlier limit of its
    training data at that hook, from its record; None when there was none or it is unknown)."""

    sae: SAE
    lm: LoadedModel
    hook: str
    max_norm: float | None


@dataclass
class LoadedRuns:
    """SAE runs at distinct hooks of one model: ``saes`` and ``max_norm`` by hook."""

    lm: LoadedModel
    saes: dict[str, SAE]
    max_norm: dict[str, float | None]
    runs: dict[str, str]


def hook_of(sae: SAE, run: str | Path, hook: str | None = None) -> str:
    """The hook ``sae`` reads: ``hook`` if given (and not another than the recorded one)."""
    recorded = sae.provenance.hook_in
    if hook and recorded and hook != recorded:
        raise InputError(f"the SAE in {run} was trained on {recorded}, not {hook}")
    if not (hook or recorded):
        raise InputError(f"the SAE in {run} does not record its hook; pass --hook")
    return str(hook or recorded)


def model_of(sae: Dictionary, run: str | Path, model: str | None = None) -> str:
    """The model ``sae`` belongs to: ``model`` if given (and not another than the recorded one)."""
    recorded = sae.provenance.model
    if model and recorded and model != recorded:
        raise InputError(f"the SAE in {run} was trained on activations of {recorded}, not {model}: "
                         "its features mean nothing there")
    if not (model or recorded):
        raise InputError(f"the SAE in {run} does not record its model; pass --model")
    return str(model or recorded)


def _check_tokenizer(sae: Dictionary, run: str | Path, found: dict[str, object] | None, where: str) -> None:
    want = sae.provenance.tokenizer
    if want and found and want != found:
        raise InputError(f"{where} has another tokenizer ({found.get('vocab_size')} tokens, sha256 "
                         f"{str(found.get('sha256'))[:12]}) than the SAE in {run} was trained with "
                         f"({want.get('vocab_size')} tokens, sha256 {str(want.get('sha256'))[:12]})")


def check_model(sae: SAE, run: str | Path, lm: LoadedModel, hook: str) -> None:
    """Refuse a model or hook other than the SAE's: by name, by tokenizer fingerprint, and by
    the width of the activation at ``hook``."""
    from dictlens.data.packing import tokenizer_fingerprint
    from dictlens.data.tap import Tap

    hook_of(sae, run, hook)
    model_of(sae, run, lm.name)
    _check_tokenizer(sae, run, tokenizer_fingerprint(lm.tokenizer), lm.name)
    probe = torch.tensor([[lm.tokenizer.eos_token_id or 0] * 2])
    width = int(Tap(lm, [hook])(probe)[hook].shape[-1])
    if width != sae.d_in:
        raise InputError(f"{hook} of {lm.name} is {width} wide; the SAE in {run} reads {sae.d_in}")


def written_hook(sae: SAE, run: str | Path) -> str:
    """The hook a transcoder writes, from its record."""
    hook = sae.provenance.hook_out
    if not hook:
        raise InputError(f"the transcoder in {run} does not record the hook it writes")
    return hook


def check_written(sae: SAE, run: str | Path, lm: LoadedModel) -> None:
    """Refuse a model whose activation at the transcoder's written hook has another width than it writes."""
    from dictlens.data.tap import Tap

    hook = written_hook(sae, run)
    probe = torch.tensor([[lm.tokenizer.eos_token_id or 0] * 2])
    width = int(Tap(lm, [hook])(probe)[hook].shape[-1])
    if width != sae.d_out:
        raise InputError(f"{hook} of {lm.name} is {width} wide; the transcoder in {run} writes {sae.d_out}")


def _check_cache_model(d: Dictionary, run: str | Path, store: ActivationStore) -> None:
    recorded = d.provenance.model
    if recorded and store.model != recorded:
        raise InputError(f"the dictionary in {run} was trained on activations of {recorded}; the cache "
                         f"{store.path} holds {store.model}'s")
    _check_tokenizer(d, run, store.manifest.get("tokenizer"), f"the cache {store.path}")


def check_cache(sae: SAE, run: str | Path, store: ActivationStore) -> None:
    """Refuse a cache harvested from another model, at another hook, or of another width."""
    hook_of(sae, run, store.hook)
    _check_cache_model(sae, run, store)
    if store.d_in != sae.d_in:
        raise InputError(f"the SAE in {run} reads width {sae.d_in}, the cache's {store.hook} has width "
                         f"{store.d_in}")


def open_cache(sae: SAE, run: str | Path, acts: str | Path, hook: str | None = None) -> ActivationStore:
    """The hook of cache ``acts`` that ``sae`` reads, checked against it."""
    from dictlens.data.store import ActivationStore

    store = ActivationStore(acts, hook or sae.provenance.hook_in)
    check_cache(sae, run, store)
    return store


def open_written(sae: SAE, run: str | Path, acts: str | Path) -> ActivationStore:
    """The hook of cache ``acts`` that a transcoder writes, checked against its width."""
    from dictlens.data.store import ActivationStore

    store = ActivationStore(acts, written_hook(sae, run))
    if store.d_in != sae.d_out:
        raise InputError(f"the transcoder in {run} writes width {sae.d_out}, the cache's {store.hook} has width "
                         f"{store.d_in}")
    return store


def load_sae(run: str | Path, device: str | torch.device | None = None, *, fmt: str | None = None,
             opts: ReadOptions | None = None) -> SAE:
    """The SAE in ``run``: a dictlens run (its record converted if written by an older
    dictlens), or a dictionary in any format :mod:`dictlens.formats` reads (``fmt`` to insist
    on one), local or ``hf://``. A dictionary of several hooks (a cross-layer transcoder, a
    crosscoder) is refused by name: :func:`load_dictionary` takes every kind."""
    from dictlens.sae.model import SAE

    d = load_dictionary(run, device, fmt=fmt, opts=opts)
    if not isinstance(d, SAE):
        raise InputError(f"{run} holds a cross-layer transcoder: this command takes one-hook dictionaries "
                         "(SAEs and transcoders); dictlens eval measures and splices a CLT")
    if d.cfg.crosscoder:
        raise InputError(f"{run} holds a crosscoder over {d.cfg.crosscoder} hooks: this command takes one-hook "
                         "dictionaries (SAEs and transcoders); dictlens eval measures a crosscoder")
    return d


def load_dictionary(run: str | Path, device: str | torch.device | None = None, *, fmt: str | None = None,
                    opts: ReadOptions | None = None) -> Dictionary:
    """The dictionary in ``run``, of any kind: an SAE, a transcoder, a crosscoder or a cross-layer
    transcoder, a dictlens run or any format :mod:`dictlens.formats` reads."""
    from dictlens import formats
    from dictlens.sae.clt import CLT, is_clt
    from dictlens.sae.model import SAE

    if fmt or formats.is_foreign(run):
        return formats.read(run, fmt=fmt, opts=opts).to(device=device)
    return CLT.load(run, device=device) if is_clt(run) else SAE.load(run, device=device)


def joint(d: Dictionary) -> int:
    """How many hooks ``d`` reads side by side: a CLT's layers, a crosscoder's hooks (0: one hook)."""
    return d.cfg.clt_layers or d.cfg.crosscoder


def joint_wiring(d: Dictionary, run: str | Path) -> Wiring:
    """The hooks a CLT or crosscoder reads and writes (one of each per layer; a crosscoder's the same
    hooks), from its record."""
    from dictlens.data.hooks import Wiring

    rec, n = d.provenance, joint(d)
    if not rec.hook_in or not rec.hook_out:
        raise InputError(f"the dictionary in {run} does not record the hooks it reads and writes")
    wiring = Wiring.of_record(rec.hook_in, rec.hook_out)
    if len(wiring.reads) != n or len(wiring.writes) != n:
        raise InputError(f"the dictionary in {run} spans {n} hooks but records {len(wiring.reads)} read and "
                         f"{len(wiring.writes)} written")
    return wiring


def _joint_hooks(d: Dictionary, wiring: Wiring) -> dict[str, tuple[int, str]]:
    """Each hook a CLT or crosscoder needs, with its width and whether the dictionary reads or writes it
    (a crosscoder's hooks once: it writes what it reads)."""
    if d.cfg.crosscoder:
        return {h: (d.cfg.d_in // d.cfg.crosscoder, "reads") for h in wiring.reads}
    return {**{h: (d.cfg.d_out, "writes") for h in wiring.writes}, **{h: (d.cfg.d_in, "reads") for h in wiring.reads}}


def check_joint_cache(d: Dictionary, run: str | Path, acts: str | Path) -> tuple[Wiring, str]:
    """A CLT's or crosscoder's wiring and the cache's model, each of its hooks checked in cache ``acts``
    (there, of its model, of its width)."""
    from dictlens.data.store import ActivationStore

    wiring = joint_wiring(d, run)
    model = ""
    for hook, (width, side) in _joint_hooks(d, wiring).items():
        store = ActivationStore(acts, hook)
        _check_cache_model(d, run, store)
        if store.d_in != width:
            raise InputError(f"the dictionary in {run} {side} width {width} at {hook}; the cache's {hook} has "
                             f"width {store.d_in}")
        model = store.model
    return wiring, model


def check_joint_model(d: Dictionary, run: str | Path, lm: LoadedModel) -> Wiring:
    """A CLT's or crosscoder's wiring, checked against ``lm``: its model and tokenizer, each hook's width."""
    from dictlens.data.packing import tokenizer_fingerprint
    from dictlens.data.tap import Tap

    model_of(d, run, lm.name)
    _check_tokenizer(d, run, tokenizer_fingerprint(lm.tokenizer), lm.name)
    wiring = joint_wiring(d, run)
    probe = torch.tensor([[lm.tokenizer.eos_token_id or 0] * 2])
    found = Tap(lm, wiring.hooks)(probe)
    for hook, (width, side) in _joint_hooks(d, wiring).items():
        if int(found[hook].shape[-1]) != width:
            raise InputError(f"{hook} of {lm.name} is {int(found[hook].shape[-1])} wide; the dictionary in "
                             f"{run} {side} {width} there")
    return wiring


def own_directory(run: str | Path, command: str) -> Path:
    """Where a command writes its outputs by default: into a dictlens run, never into a
    dictionary of another format (a download, another library's folder)."""
    from dictlens import formats

    if formats.is_foreign(run):
        raise ConfigError(f"{command}: {run} is a dictionary in another format; give --out for what {command} writes")
    return Path(run)


def load_runs(runs: Sequence[str | Path], model: str | None = None, device: str | None = None,
              check: Callable[[dict[str, SAE]], None] | None = None, hook: str | None = None,
              force: bool = False) -> LoadedRuns:
    """Load the SAEs in ``runs`` (one per hook) and the model they were trained on, on one
    device. ``check(saes)`` runs before the model loads (e.g. that edited features exist).
    ``hook``: for a single run, the hook it reads (it must be the recorded one, if any).
    A dictionary of another format passes the preflight on the model first (its result is
    in ``provenance.notes["preflight"]``), unless ``force``."""
    from dictlens.data.models import default_device, load_model

    if not runs:
        raise ConfigError("give at least one SAE run")
    device = device or str(default_device())
    saes: dict[str, SAE] = {}
    paths: dict[str, str] = {}
    for run in runs:
        sae = load_sae(run, device=device)
        at = hook_of(sae, run, hook if len(runs) == 1 else None)
        if at in saes:
            raise ConfigError(f"two SAEs at {at} ({paths[at]} and {run}); give one per hook")
        saes[at], paths[at] = sae, str(run)
    if check is not None:
        check(saes)
    names = {model_of(s, paths[h], model) for h, s in saes.items()}
    if len(names) > 1:
        raise InputError(f"the SAEs were trained on different models ({', '.join(sorted(names))})")
    lm = load_model(names.pop(), device=device)
    for at, sae in saes.items():
        check_model(sae, paths[at], lm, at)
        _preflight_if_foreign(sae, paths[at], lm, at, force)
    return LoadedRuns(lm, saes, {h: s.provenance.outlier_limit for h, s in saes.items()}, paths)


def _preflight_if_foreign(sae: SAE, run: str, lm: LoadedModel, hook: str, force: bool) -> None:
    from dataclasses import asdict

    from dictlens import formats
    from dictlens.formats.preflight import preflight, sample

    if not formats.is_foreign(run):
        return
    x = sample(lm, hook, max_norm=sae.provenance.outlier_limit).to(sae.device)
    report = preflight(sae, x, where=run, force=force)
    sae.provenance = sae.provenance.replace(notes={**sae.provenance.notes, "preflight": asdict(report)})


def load_run(run: str | Path, model: str | None = None, device: str | None = None,
             check: Callable[[SAE], None] | None = None, hook: str | None = None, force: bool = False) -> Loaded:
    """Load the SAE in ``run`` and its model (``model`` defaults to the one it was trained on).
    ``check(sae)`` runs before the model loads; ``hook``, when given, must be the SAE's."""
    def check_one(saes: dict[str, SAE]) -> None:
        if check is not None:
            check(next(iter(saes.values())))

    r = load_runs([run], model, device, check_one, hook=hook, force=force)
    h, sae = next(iter(r.saes.items()))
    return Loaded(sae, r.lm, h, r.max_norm[h])
