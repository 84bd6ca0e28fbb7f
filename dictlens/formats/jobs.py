"""``dictlens convert`` and ``dictlens export`` as library calls."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING

from dictlens.config import field
from dictlens.errors import InputError
from dictlens.formats import NAMES
from dictlens.formats.base import ReadOptions
from dictlens.formats.preflight import Preflight, preflight, sample

if TYPE_CHECKING:
    from dictlens.sae.clt import Dictionary
    from dictlens.sae.model import SAE


@dataclass(kw_only=True)
class ConvertJob:
    """Read a dictionary in a foreign format (a folder, a file or hf://REPO/PATH) into a dictlens run."""

    src: str = field(positional=True, help="the dictionary: a folder, a file, or hf://OWNER/REPO[/PATH][@REVISION]")
    out: str = field(help="dictlens run directory to write (config.json + sae.safetensors)")
    from_format: str | None = field(None, flag="--from", choices=NAMES, help="the format (default: detected)")
    norm_scaling_factor: float | None = field(None, help="the normalisation factor the files do not hold "
                                                         "(SAELens expected_average_only_in releases)")
    model: str | None = field(None, help="the model it reads (default: the one its files name)")
    hook: str | None = field(None, help="the dictlens hook it reads (default: mapped from its files' hook name)")
    overwrite: bool = field(False, help="replace a dictlens run already in --out")
    check: bool = field(False, help="run it on real activations of the model at its hook first (the preflight); "
                                    "refuse an impossible result, naming the likely cause")
    check_tokens: int = field(4096, help="tokens of --check-text the preflight reconstructs")
    check_text: str = field("default", help="text the preflight runs through the model")
    force: bool = field(False, help="convert even when the preflight finds the result impossible")


@dataclass
class Converted:
    """The dictlens run written, its dictionary, and the preflight's measurement (with --check); a
    circuit-tracer transcoder set converts into one run per layer (``layers``: OUT/layer_L each)."""

    out: Path
    sae: Dictionary
    preflight: Preflight | None
    layers: list[Path] = dc_field(default_factory=list)


@dataclass(kw_only=True)
class ExportJob:
    """Write a dictionary (a dictlens run or any readable format) in another library's layout."""

    run: str = field(positional=True, help="a dictlens run directory, or any dictionary dictlens reads "
                                           "(neuronpedia: a run with an analysis, or the analysis directory)")
    to: str = field(choices=(*NAMES, "neuronpedia"), help="the format to write (neuronpedia: the analysis)")
    out: str = field(help="directory to write")
    overwrite: bool = field(False, help="replace what is in --out")
    source_set: str = field("dictlens", help="neuronpedia: the source set's name (the source is LAYER-SET)")
    model_id: str | None = field(None, help="neuronpedia: the model's id there (default: the model's name)")
    also: list[str] = field(default_factory=list, flag="--also",
                            help="circuit-tracer: the other layers' transcoders, written with RUN as one transcoder "
                                 "set (circuit-tracer needs every layer from 0)")


def convert_job(job: ConvertJob) -> Converted:
    """Read ``job.src``, check it on the model with ``job.check``, save it as a dictlens run in ``job.out``."""
    from dictlens.formats import circuit_tracer
    from dictlens.load import load_dictionary
    from dictlens.sae.model import CONFIG_FILE, SAE

    out = Path(job.out)
    if (out / CONFIG_FILE).exists() and not job.overwrite:
        raise InputError(f"{out} already holds a dictionary: choose another --out, or pass --overwrite")
    opts = ReadOptions(norm_scaling_factor=job.norm_scaling_factor, model=job.model, hook=job.hook)
    if circuit_tracer.is_set(Path(job.src)):   # every layer, a run each
        files = circuit_tracer.layer_files(Path(job.src))
        if job.hook:
            raise InputError("--hook: a transcoder set's hooks come from its config, one per layer")
        layers = {layer: load_dictionary(f, fmt="circuit-tracer", opts=opts) for layer, f in files.items()}
        taken = [out / f"layer_{layer}" for layer in layers if (out / f"layer_{layer}" / CONFIG_FILE).exists()]
        if taken and not job.overwrite:
            raise InputError(f"{taken[0]} already holds a dictionary: choose another --out, or pass --overwrite")
        runs = [d.save(out / f"layer_{layer}") for layer, d in layers.items()]
        return Converted(out, next(iter(layers.values())), None, runs)
    sae = load_dictionary(job.src, fmt=job.from_format, opts=opts)
    report = None
    if job.check:
        if not isinstance(sae, SAE) or sae.cfg.crosscoder:
            raise InputError("--check: the preflight runs one-hook dictionaries on their hook; this one reads several")
        report = check_on_model(sae, job.src, tokens=job.check_tokens, text=job.check_text, force=job.force)
        sae.provenance = sae.provenance.replace(notes={**sae.provenance.notes, "preflight": asdict(report)})
    return Converted(sae.save(out), sae, report)


def check_on_model(sae: SAE, src: str, *, tokens: int, text: str, force: bool) -> Preflight:
    """The preflight on the model and hook the dictionary records."""
    from dictlens.data.models import load_model
    from dictlens.load import check_model, hook_of, model_of

    lm = load_model(model_of(sae, src))
    hook = hook_of(sae, src)
    check_model(sae, src, lm, hook)
    x = sample(lm, hook, tokens=tokens, text=text, max_norm=sae.provenance.outlier_limit)
    return preflight(sae, x, where=src, force=force)


def export_job(job: ExportJob) -> list[Path]:
    """Write ``job.run`` in format ``job.to`` into ``job.out``; the files written."""
    from dictlens import formats
    from dictlens.load import load_sae

    if job.to == "neuronpedia":
        from dictlens.analysis.db import DB_FILE
        from dictlens.formats import neuronpedia

        out = Path(job.out)
        if out.exists() and any(out.iterdir()) and not job.overwrite:
            raise InputError(f"{out} is not empty: choose another --out, or pass --overwrite")
        analysis = next((p for p in (Path(job.run), Path(job.run) / "analysis") if (p / DB_FILE).is_file()), None)
        if analysis is None:
            raise InputError(f"no analysis in {job.run}: run `dictlens analyze {job.run}` first")
        return neuronpedia.export(analysis, out, source_set=job.source_set, model_id=job.model_id)
    if job.also and job.to != "circuit-tracer":
        raise InputError(f"--also: only circuit-tracer writes several dictionaries as one (a transcoder set), not "
                         f"{job.to}")
    from dictlens.load import load_dictionary

    return formats.write(load_dictionary(job.run), job.out, job.to, overwrite=job.overwrite,
                         also=[load_sae(run) for run in job.also])
