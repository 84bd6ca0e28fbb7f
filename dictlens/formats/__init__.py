"""Foreign dictionary formats: one converter per format, one registry.

``read(src)`` turns a folder or file in any known layout (or ``hf://REPO[/PATH][@REV]``)
into a dictlens :class:`~dictlens.sae.model.SAE` whose provenance names the format and
where the weights came from; ``write(sae, out, to)`` writes one in a format's layout. A
new format is one module with a :class:`~dictlens.formats.base.Format` and a line here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dictlens.errors import FormatError, InputError
from dictlens.formats import (
    circuit_tracer,
    dictionary_learning,
    gemma_scope,
    goodfire,
    llama_scope,
    openai,
    saelens,
    sparsify,
)
from dictlens.formats.base import Format, ReadOptions

if TYPE_CHECKING:
    from dictlens.sae.clt import Dictionary
    from dictlens.sae.model import SAE

REGISTRY: dict[str, Format] = {f.name: f for f in (saelens.FORMAT, gemma_scope.FORMAT, gemma_scope.FORMAT_2,
                                                     sparsify.FORMAT, dictionary_learning.FORMAT, llama_scope.FORMAT,
                                                     openai.FORMAT, goodfire.FORMAT, circuit_tracer.FORMAT)}
NAMES = tuple(REGISTRY)
HF_PREFIX = "hf://"


def get(name: str) -> Format:
    if name not in REGISTRY:
        from dictlens.config import suggest

        raise FormatError(f"format: expected one of {', '.join(NAMES)}, found {name!r}{suggest(name, list(NAMES))}")
    return REGISTRY[name]


def is_foreign(src: str | Path) -> bool:
    """Whether ``src`` is something other than a dictlens run directory."""
    from dictlens.sae.clt import FORMAT as CLT_FORMAT
    from dictlens.sae.model import CONFIG_FILE, FORMAT

    if str(src).startswith((HF_PREFIX, "saelens:")):
        return True
    cfg = Path(src) / CONFIG_FILE
    if not cfg.is_file():
        return Path(src).exists()   # a missing path is the dictlens loader's error to name
    import json

    try:
        return bool(json.loads(cfg.read_text()).get("format") not in (FORMAT, CLT_FORMAT))
    except (ValueError, AttributeError):
        return True


def resolve(src: str | Path) -> Path:
    """A local path for ``src``: the path itself, or a ``hf://REPO[/PATH][@REVISION]``
    snapshot fetched through huggingface_hub (only PATH's files)."""
    s = str(src)
    if not s.startswith(HF_PREFIX):
        p = Path(s)
        if not p.exists():
            raise InputError(f"{s} does not exist")
        return p
    ref, _, revision = s[len(HF_PREFIX):].partition("@")
    parts = ref.strip("/").split("/")
    if len(parts) < 2:
        raise InputError(f"{s}: expected hf://OWNER/REPO[/PATH][@REVISION]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = snapshot_download(repo, revision=revision or None, allow_patterns=[f"{sub}/*"] if sub else None)
    except LocalEntryNotFoundError:
        raise InputError(f"{s}: not in the local Hugging Face cache, and the hub cannot be reached "
                         "(offline, or HF_HUB_OFFLINE=1): download it once online, or give a local copy") from None
    except HfHubHTTPError as e:
        raise InputError(f"{s}: the hub refused it ({e})") from None
    path = Path(root) / sub
    if not path.exists():
        raise InputError(f"{s}: the repository has no {sub!r}")
    return path


def detect(path: Path) -> Format:
    """The format of ``path``; an unknown layout names the files found and the formats known."""
    for f in REGISTRY.values():
        if f.detect(path):
            return f
    if path.is_dir():
        inner = sorted(c.name for c in path.iterdir() if c.is_dir() and any(f.detect(c) for f in REGISTRY.values()))
        if inner:
            raise FormatError(f"{path} holds several dictionaries ({', '.join(inner[:8])}"
                              + (", ..." if len(inner) > 8 else "") + f"): give one, e.g. {path / inner[0]}")
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    raise FormatError(f"{path}: no known dictionary layout (found {', '.join(found) or 'nothing'}); known: "
                      + "; ".join(f"{f.name}: {f.describe}" for f in REGISTRY.values()))


def read(src: str | Path, *, fmt: str | None = None, opts: ReadOptions | None = None) -> Dictionary:
    """The dictionary in ``src`` (any known format, or ``fmt``), as a dictlens SAE (a CLT where the
    format holds one); ``src`` may be ``saelens:RELEASE/SAE_ID`` (SAELens's registry, with the sae-lens
    package)."""
    from dictlens.formats import registry

    l0 = None
    if str(src).startswith(registry.PREFIX):
        src, fmt, opts, l0 = registry.resolve(str(src), opts or ReadOptions())
    path = resolve(src)
    f = get(fmt) if fmt else detect(path)
    if fmt and not f.detect(path):
        raise FormatError(f"{path}: not in the {f.name} layout ({f.describe})")
    sae = f.read(path, opts or ReadOptions())
    if l0 is not None:   # the registry's L0, for the preflight
        sae.provenance = sae.provenance.replace(notes={**sae.provenance.notes, "recorded_l0": l0})
    return sae


def write(sae: Dictionary, out: str | Path, to: str, *, overwrite: bool = False,
          also: Sequence[SAE] = ()) -> list[Path]:
    """Write ``sae`` into directory ``out`` in format ``to``; an existing one is kept unless ``overwrite``.
    ``also``: circuit-tracer's transcoder sets, the other layers' transcoders written with it as one set."""
    from dictlens.sae.clt import CLT

    f = get(to)
    if not f.writes:
        raise FormatError(f"{f.name}: dictlens reads this format but does not write it")
    if sae.cfg.crosscoder:
        raise FormatError(f"{f.name}: holds dictionaries of one hook; this crosscoder reads {sae.cfg.crosscoder}")
    if (isinstance(sae, CLT) or also) and f is not circuit_tracer.FORMAT:
        what = "a cross-layer transcoder" if isinstance(sae, CLT) else "a set of transcoders"
        raise FormatError(f"{f.name}: holds one dictionary of one layer, not {what} (write it as circuit-tracer)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty: choose another --out, or pass --overwrite")
    if isinstance(sae, CLT):
        return circuit_tracer.FORMAT.write(sae, out)
    if also:
        return circuit_tracer.write_set([sae, *also], out)
    return f.write(sae, out)
