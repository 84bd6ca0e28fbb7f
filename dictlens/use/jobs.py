"""The steps of :mod:`dictlens.use` as library calls, each driven by one config dataclass whose
fields are also its command-line flags: ``generate`` (:class:`GenerateJob`), ``ablate``,
``monitor``, ``attribute``. Each job loads its runs through :mod:`dictlens.load`, does the
work and writes every output it names."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from dictlens.config import field
from dictlens.errors import ConfigError, InputError
from dictlens.formats.preflight import FORCE_HELP
from dictlens.use.steer import GenerateConfig

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE
    from dictlens.use.ablate import AblationResult
    from dictlens.use.attribute import Attribution
    from dictlens.use.splice import Edit
    from dictlens.use.steer import Generation


@dataclass(kw_only=True)
class ModelChoice:
    """The model the runs are spliced into, and where."""

    model: str | None = field(None, help="model (default: the one the SAE was trained on; another is refused)")
    device: str | None = field(None, help="cpu or cuda (default: cuda when there is one, else cpu)")
    force: bool = field(False, help=FORCE_HELP)


# ---- generate ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class GenerateJob(ModelChoice):
    """Continue a prompt with and without feature edits, the same seed for both."""

    runs: list[str] = field(positional=True, help="SAE run directories, one per hook (edits go to the first "
                                                  "unless prefixed HOOK/)")
    prompt: str = field(help="the prompt to continue")
    steer: list[str] = field(default_factory=list, metavar="[HOOK/]F:COEFF",
                             help="add COEFF × feature F's unit decoder direction (raw activation units)")
    clamp: list[str] = field(default_factory=list, metavar="[HOOK/]F:VALUE", help="clamp feature F's code to VALUE")
    scale: list[str] = field(default_factory=list, metavar="[HOOK/]F:FACTOR", help="multiply feature F's code")
    ablate: list[str] = field(default_factory=list, metavar="[HOOK/]F", help="zero feature F")
    from_pos: int = field(0, help="edit only from this token position on (0: every position, the prompt included)")
    error_term: bool = field(True, help="keep x − x̂, so that only the edits act (--no-error-term: run the model "
                                        "on the SAE's reconstruction)")
    generation: GenerateConfig = field(default_factory=GenerateConfig, help="how to continue")
    width: int = field(100, help="terminal width of the two columns")
    json: str | None = field(None, help="also write both continuations here")

    def edits(self) -> list[tuple[str | None, Edit]]:
        """(hook or None for the first run's, Edit) of every edit flag ``[HOOK/]F:VALUE``."""
        from dictlens.use.splice import parse_edit

        edits: list[tuple[str | None, Edit]] = []
        for kind, specs in (("add", self.steer), ("clamp", self.clamp), ("scale", self.scale),
                            ("zero", self.ablate)):
            for spec in specs:
                hook, sep, rest = spec.rpartition("/")
                edits.append((hook if sep else None, parse_edit(rest, kind, self.from_pos)))  # type: ignore[arg-type]
        if not edits:
            raise ConfigError("generate: give at least one --steer, --clamp, --scale or --ablate")
        return edits


def edits_by_hook(edits: list[tuple[str | None, Edit]], saes: dict[str, SAE]) -> dict[str, list[Edit]]:
    """Each hook's edits (unprefixed ones at the first run's hook), checked against its SAE."""
    from dictlens.use.splice import check_edits

    first = next(iter(saes))
    out: dict[str, list[Edit]] = {}
    for hook, e in edits:
        hook = hook or first
        if hook not in saes:
            raise ConfigError(f"an edit at {hook}, where none of the runs is ({', '.join(saes)})")
        out.setdefault(hook, []).append(e)
    for hook, es in out.items():
        check_edits(saes[hook], es, f" (at {hook})")
    return out


@dataclass
class Steered:
    """Both continuations, the runs and model, each hook's edits and the activation norm on the
    prompt there (median over its real tokens: the scale an added coefficient is read against)."""

    generation: Generation
    runs: dict[str, str]
    model: str
    edits: dict[str, list[Edit]]
    median_norm: dict[str, float]


def generate_job(job: GenerateJob) -> Steered:
    """Load the runs, continue the prompt with and without the edits; write ``job.json``."""
    from dictlens.data.tap import Tap
    from dictlens.data.tokens import not_special
    from dictlens.load import load_runs
    from dictlens.use.steer import prompt_ids, steered_generation

    edits = job.edits()
    by_hook: dict[str, list[Edit]] = {}
    r = load_runs(job.runs, model=job.model, device=job.device, force=job.force,
                  check=lambda saes: by_hook.update(edits_by_hook(edits, saes)))
    ids = prompt_ids(r.lm, job.prompt, job.generation)
    acts = Tap(r.lm, list(r.saes))(ids)
    keep = not_special(r.lm.tokenizer, ids[0])
    norms = {hook: float(acts[hook][0][keep].float().norm(dim=-1).median()) for hook in by_hook}
    g = steered_generation(r.lm, r.saes, by_hook, job.prompt, job.generation, error_term=job.error_term,
                           max_norm=r.max_norm)
    if job.json:
        from dictlens.io import atomic_write_json

        atomic_write_json(Path(job.json), {"runs": r.runs, "prompt": g.prompt, "unsteered": g.unsteered,
                                           "steered": g.steered, "edits": g.edits, "config": asdict(job.generation)})
    return Steered(g, r.runs, r.lm.name, by_hook, norms)


# ---- ablate ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class AblateJob(ModelChoice):
    """Zero or mean-ablate features: the change in loss and in chosen tokens' logits."""

    run: str = field(positional=True, help="SAE run directory")
    feature: list[int] = field(help="feature to ablate")
    mode: str = field("zero", choices=("zero", "mean"), help="zero, or the feature's mean over the text")
    prompt: str | None = field(None, help="a prompt: tokens' logits at its last position")
    text: str | None = field(None, help="a text source (path, `default`): loss over it, tokens' logits averaged")
    token: list[str] = field(default_factory=list, help="a token whose logit to follow, e.g. ' Paris'")
    tokens: int = field(4096, help="tokens of --text to score")
    skip_tokens: int = field(0, help="skip the first N tokens of --text")
    context: int = field(128, help="context length for --text")
    json: str | None = field(None, help="also write the result here")

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.text is None):
            raise ConfigError("ablate: give exactly one of --prompt or --text")
        if self.mode not in ("zero", "mean"):
            raise ConfigError(f"mode: expected zero or mean, found {self.mode!r}")


def ablate_job(job: AblateJob) -> AblationResult:
    """Load the run, ablate over the prompt or the text; write ``job.json``."""
    from dictlens.data.tokens import text_batches
    from dictlens.load import load_run
    from dictlens.use.ablate import ablate, prompt_batches

    run = load_run(job.run, model=job.model, device=job.device, force=job.force)
    batches = (prompt_batches(run.lm, [job.prompt]) if job.prompt is not None else
               text_batches(run.lm, str(job.text), tokens=job.tokens, context=job.context,
                            skip_tokens=job.skip_tokens))
    mode: Literal["zero", "mean"] = "mean" if job.mode == "mean" else "zero"
    r = ablate(run.lm, run.sae, run.hook, job.feature, batches, mode=mode, tokens=job.token,
               last_only=job.prompt is not None, max_norm=run.max_norm)
    if job.json:
        from dictlens.io import atomic_write_json

        atomic_write_json(Path(job.json), r.to_dict())
    return r


# ---- monitor -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class MonitorJob(ModelChoice):
    """Stream text through the model; one JSON event per firing above its threshold."""

    run: str = field(positional=True, help="SAE run directory")
    inputs: list[str] = field(default_factory=list, positional=True,
                              help="text sources (a file, a folder, a .jsonl); none or -: stdin, one document per line")
    feature: list[str] = field(metavar="F[:THRESHOLD]",
                               help="feature to watch, firing when its code exceeds THRESHOLD (default 0)")
    jsonl: bool = field(False, help="stdin lines are JSON records (--text-field, optional id)")
    text_field: str = field("text", help="field of JSON records / .jsonl files")
    context: int = field(256, help="tokens per window of a long document")
    batch_size: int = field(8, help="windows per forward pass (1 for interactive input)")
    window: int = field(8, help="tokens of text shown on each side of a firing")
    out: str | None = field(None, help="write events here instead of stdout")
    flush: bool = field(False, help="flush after every event")

    def documents(self, stdin: TextIO) -> Iterator[tuple[Any, str]]:
        """(id, text) of every document: stdin line by line (or JSON records with ``jsonl``),
        or each path's documents (a .jsonl file: one per record)."""
        from dictlens.data.text import iter_documents

        for source in self.inputs or ["-"]:
            if source != "-":
                for n, doc in enumerate(iter_documents(source, self.text_field)):
                    yield f"{source}:{n}", doc
                continue
            for lineno, line in enumerate(stdin, 1):
                if not line.strip():
                    continue
                if not self.jsonl:
                    yield lineno, line.rstrip("\n")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"stdin:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or self.text_field not in record:
                    raise InputError(f"stdin:{lineno}: no field {self.text_field!r}; set --text-field")
                yield record.get("id", lineno), str(record[self.text_field])


@dataclass
class Monitored:
    events: int
    documents: int
    seconds: float


def monitor_job(job: MonitorJob, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> Monitored:
    """Scan every document, writing one JSON line per event to ``job.out`` (or ``stdout``)."""
    from dictlens.load import load_run
    from dictlens.use.monitor import Monitor, parse_watch
    from dictlens.use.splice import Edit, check_edits

    watches = [parse_watch(s) for s in job.feature]
    run = load_run(job.run, model=job.model, device=job.device, force=job.force,
                   check=lambda sae: check_edits(sae, [Edit(w.feature, "zero") for w in watches]))
    monitor = Monitor(run.lm, run.sae, run.hook, watches, window=job.window, max_norm=run.max_norm)
    out = open(job.out, "w", encoding="utf-8") if job.out else (stdout or sys.stdout)  # noqa: SIM115
    n_events, n_docs, t0 = 0, 0, time.perf_counter()

    def counted() -> Iterator[tuple[Any, str]]:
        nonlocal n_docs
        for doc in job.documents(stdin or sys.stdin):
            n_docs += 1
            yield doc

    try:
        for event in monitor.scan(counted(), context=job.context, batch_size=job.batch_size,
                                  sort_windows=1 if job.batch_size == 1 else 8 * job.batch_size):
            out.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            if job.flush:
                out.flush()
            n_events += 1
    finally:
        if job.out:
            out.close()
    return Monitored(n_events, n_docs, time.perf_counter() - t0)


# ---- attribute ---------------------------------------------------------------------------
@dataclass(kw_only=True)
class AttributeJob(ModelChoice):
    """Rank features by attribution patching, check them by ablation; edges across SAEs."""

    runs: list[str] = field(positional=True, help="SAE run directories, one per hook (several: feature circuits)")
    prompt: str = field(help="the prompt whose metric is explained")
    metric: str = field("logprob", choices=("logit", "logprob", "logit-diff", "loss"),
                        help="what to explain, at the prompt's last position (loss: over the whole prompt)")
    token: list[str] = field(default_factory=list,
                             help="the token of logit/logprob, or the two of logit-diff (A − B), e.g. ' Paris'")
    top: int = field(20, help="features listed per hook")
    check: int = field(10, help="of them, checked by real ablation")
    edges: int = field(10, help="downstream features whose incoming edges are computed")
    out: str | None = field(None, help="directory for attribution.json and graph.png")


@dataclass
class Attributed:
    result: Attribution
    written: list[Path]


def attribute_job(job: AttributeJob) -> Attributed:
    """Attribute the metric to the runs' features; write attribution.json and graph.png into ``job.out``."""
    from dictlens.load import load_runs
    from dictlens.use.attribute import attribute, make_metric, plot_graph

    loaded = load_runs(job.runs, model=job.model, device=job.device, force=job.force)
    metric = make_metric(loaded.lm, job.metric, job.token)
    r = attribute(loaded.lm, loaded.saes, job.prompt, metric, top=job.top, check=job.check, edges=job.edges,
                  max_norm=loaded.max_norm)
    written: list[Path] = []
    if job.out:
        from dictlens.io import atomic_write_json

        out = Path(job.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "attribution.json", r.to_dict())
        written = [out / "attribution.json",
                   Path(plot_graph(r, out / "graph.png", labels=lens_labels(loaded.lm, loaded.saes, r)))]
    return Attributed(r, written)


def lens_labels(lm: LoadedModel, saes: dict[str, SAE], r: Attribution) -> dict[tuple[str, int | str], str]:
    """Each shown feature's three top logit-lens tokens."""
    import torch

    from dictlens.analysis.lens import logit_lens, unembedding

    W_U, gain = unembedding(lm.model)
    labels: dict[tuple[str, int | str], str] = {}
    for hook, nodes in r.nodes.items():
        feats = [n.feature for n in nodes if isinstance(n.feature, int)]
        if not feats:
            continue
        dirs = saes[hook].feature_directions().detach()[torch.tensor(feats)]
        top, _, _, _ = logit_lens(dirs, W_U, gain, n=3)
        for f, ids in zip(feats, top, strict=True):
            labels[(hook, f)] = " ".join(repr(lm.tokenizer.decode([int(i)])) for i in ids)
    return labels
