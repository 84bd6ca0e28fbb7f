"""``dictlens convert`` and ``export``: dictionaries in other libraries' formats."""

from __future__ import annotations

from typing import Any

from dictlens.cli.common import command, written
from dictlens.formats.jobs import ConvertJob, ExportJob


def _convert(job: ConvertJob) -> int:
    from dictlens.formats.jobs import convert_job

    c = convert_job(job)
    sae, p = c.sae, c.sae.provenance
    if c.layers:
        print(f"{job.src} ({p.source}): a transcoder set of {len(c.layers)} layers, {sae.cfg.activation}, "
              f"F={sae.n_features:,} per layer, model {p.model or 'unknown'}")
        print(f"dictlens runs: {c.layers[0]} ... {c.layers[-1]}")
        return 0
    print(f"{job.src} ({p.source}): {sae.cfg.activation} {sae.cfg.family}, F={sae.n_features:,}, D={sae.d_in}, "
          f"model {p.model or 'unknown'}, hook {p.hook_in or 'unknown'}"
          + (f" -> {p.hook_out}" if sae.cfg.transcoder else "")
          + (f" (theirs: {p.notes['saelens']['hook_name']})" if p.notes.get("saelens", {}).get("hook_name") else ""))
    if c.preflight is not None:
        print(c.preflight.line() + (f"; FORCED past: {c.preflight.problem}" if c.preflight.problem else ""))
    print(f"dictlens run: {c.out}")
    return 0


def _export(job: ExportJob) -> int:
    from dictlens.formats.jobs import export_job

    print(written(export_job(job)))
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "convert", "read a dictionary in another library's format into a dictlens run", ConvertJob, _convert)
    command(sub, "export", "write a dictionary in another library's format", ExportJob, _export)
