"""``saelens:RELEASE/SAE_ID``: a release of SAELens's registry (``pretrained_saes.yaml``, which
ships with the ``sae-lens`` package, an optional extra) resolved to its hub files, its format
(the registry's ``conversion_func``), and what the files do not hold (the normalisation
factor, the model)."""

from __future__ import annotations

from typing import Any

from dictlens.errors import FormatError, InputError
from dictlens.formats.base import ReadOptions
from dictlens.formats.hooks import hf_model_name

PREFIX = "saelens:"
# the registry's conversion functions dictlens has a reader for
CONVERSIONS = {None: "saelens", "sae_lens": "saelens", "gemma_2": "gemma-scope", "gemma_3": "gemma-scope-2",
               "llama_scope": "llama-scope", "dictionary_learning_1": "dictionary-learning", "sparsify": "sparsify"}


def registry() -> dict[str, Any]:
    """SAELens's release registry, read from the installed package's YAML file."""
    try:
        from importlib.resources import files

        text = (files("sae_lens") / "pretrained_saes.yaml").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        raise InputError("saelens: sources need SAELens's registry, which ships with the sae-lens package: "
                         "pip install sae-lens (or give the release's hf://REPO/PATH)") from None
    import yaml

    data = yaml.safe_load(text)
    return dict(data.get("SAE_LOOKUP", data))


def resolve(ref: str, opts: ReadOptions, releases: dict[str, Any] | None = None
            ) -> tuple[str, str, ReadOptions, float | None]:
    """(``hf://`` source, format, options, the L0 the registry records) of ``saelens:RELEASE/SAE_ID``."""
    body = ref[len(PREFIX):]
    releases = registry() if releases is None else releases
    release = next((r for r in sorted(releases, key=len, reverse=True) if body.startswith(r + "/")), None)
    if release is None:
        from dictlens.config import suggest

        name = body.split("/")[0]
        raise InputError(f"{ref}: no release {name!r} in SAELens's registry{suggest(name, list(releases))}; "
                         "expected saelens:RELEASE/SAE_ID")
    entry, sae_id = releases[release], body[len(release) + 1:]
    saes = {s["id"]: s for s in entry.get("saes", [])}
    if sae_id not in saes:
        from dictlens.config import suggest

        raise InputError(f"{ref}: release {release} has no SAE {sae_id!r}{suggest(sae_id, list(saes))}")
    conversion = entry.get("conversion_func")
    if conversion not in CONVERSIONS:
        raise FormatError(f"{ref}: the registry reads it with {conversion!r}, a format dictlens has no reader for yet")
    sae = saes[sae_id]
    factor = opts.norm_scaling_factor if opts.norm_scaling_factor is not None else sae.get("norm_scaling_factor")
    model = opts.model or hf_model_name(entry.get("model"))
    src = f"hf://{entry['repo_id']}/{sae['path']}".rstrip("/")
    l0 = sae.get("l0")
    return (src, CONVERSIONS[conversion], ReadOptions(norm_scaling_factor=factor, model=model, hook=opts.hook),
            float(l0) if isinstance(l0, (int, float)) else None)
