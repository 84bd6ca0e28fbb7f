"""The Neuronpedia export of an analysis: what Neuronpedia's importer reads.

``OUT/<layer>-<set>/`` holds ``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``,
``source.jsonl`` (one record each) and, in batches, ``features/batch-N.jsonl.gz`` (per
feature: its density ``frac_nonzero``, the logit lens as ``pos_str/pos_values`` and
``neg_str/neg_values``, the activation histogram as ``freq_hist_data_bar_*``, its nearest
features by decoder cosine as ``topkCosSim*``, the decoder direction as a steering vector)
and ``activations/batch-N.jsonl.gz`` (per example context: tokens, per-token values, the
max and min and where the max is, and the activation bin the example was drawn from:
``binMin`` / ``binMax`` / ``binContains``; the top examples are bin −1, as in SAEDashboard's
exports). Field names follow Neuronpedia's ``convert-saedashboard-to-neuronpedia-export``;
a public upload still goes through Neuronpedia's maintainers.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

from dictlens.errors import InputError
from dictlens.formats.hooks import to_transformer_lens
from dictlens.io import atomic_write_bytes

CREATOR = "dictlens"


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _layer(hook: str) -> int:
    m = re.search(r"\.(\d+)(?:\.|$|:)", hook)
    if m is None:
        raise InputError(f"hook {hook!r}: Neuronpedia sources are named by layer, and this hook has none")
    return int(m.group(1))


def source_id(hook: str, source_set: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]{1,32}", source_set):
        raise InputError(f"source set {source_set!r}: Neuronpedia names are letters, digits and hyphens, "
                         "at most 32 characters")
    return f"{_layer(hook)}-{source_set}"


def export(analysis: Path, out: Path, *, source_set: str = "dictlens", model_id: str | None = None,
           batch: int = 256) -> list[Path]:
    """Write the Neuronpedia export of the analysis in ``analysis`` into ``out``; the files written."""
    import numpy as np

    from dictlens.analysis.db import FeatureDB

    db = FeatureDB(analysis)
    meta = db.meta
    model = model_id or str(meta["model"]).split("/")[-1].lower()
    sid = source_id(str(meta["hook"]), source_set)
    root = out / sid
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    vectors = _vectors(meta)
    hook_name = to_transformer_lens(str(meta["hook"]), str(meta["model"])) or str(meta["hook"])
    edges = np.asarray(meta["hist_edges"], np.float64)
    centres = np.sqrt(np.clip(edges[:-1], 1e-12, None) * edges[1:]).tolist()
    for sub in ("features", "activations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    files = []
    for name, record in (
            ("release.jsonl", {"name": source_set, "description": f"dictlens analysis of {meta['sae']}",
                               "descriptionShort": source_set, "urls": [], "creatorNameShort": CREATOR,
                               "creatorName": CREATOR, "creatorId": CREATOR, "createdAt": created}),
            ("model.jsonl", {"id": model, "instruct": model.endswith("-it") or "instruct" in model,
                             "displayNameShort": model, "displayName": model, "creatorId": CREATOR,
                             "createdAt": created, "updatedAt": created}),
            ("sourceset.jsonl", {"modelId": model, "name": source_set, "creatorId": CREATOR, "createdAt": created,
                                 "creatorName": CREATOR, "releaseName": source_set,
                                 "description": f"{meta['n_features']:,} features at {meta['hook']}",
                                 "visibility": "PUBLIC"}),
            ("source.jsonl", {"modelId": model, "setName": source_set, "visibility": "PUBLIC",
                              "dataset": str(meta["config"]["text"]), "id": sid, "num_prompts": meta["contexts"],
                              "num_tokens_in_prompt": meta["context"], "hfRepoId": None, "hfFolderId": None,
                              "creatorId": CREATOR})):
        atomic_write_bytes(root / name, _jsonl([record]))
        files.append(root / name)
    for start in range(0, db.n_features, batch):
        feats, acts = [], []
        for f in range(start, min(start + batch, db.n_features)):
            row, a = _feature(db, f, model, sid, created, centres, vectors, hook_name)
            feats.append(row)
            acts.extend(a)
        n = start // batch
        for kind, records in (("features", feats), ("activations", acts)):
            path = root / kind / f"batch-{n}.jsonl.gz"
            atomic_write_bytes(path, gzip.compress(_jsonl(records), compresslevel=5))
            files.append(path)
    return files


def _vectors(meta: dict[str, Any]) -> Any:
    """The decoder rows [F, D] when the analysed SAE is at hand, else None (no steering vectors)."""
    from dictlens.errors import DictlensError
    from dictlens.load import load_sae

    try:
        return load_sae(meta["sae"]).W_dec.detach() if meta.get("sae") else None
    except DictlensError:
        return None


def _feature(db: Any, f: int, model: str, sid: str, created: str, centres: list[float], vectors: Any,
             hook_name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    row = db.feature(f)
    nonzero = [(c, h) for c, h in zip(centres, row["hist"], strict=False) if h]
    vector = vectors[f].tolist() if vectors is not None else []
    feature = {
        "modelId": model, "layer": sid, "index": f, "creatorId": CREATOR, "createdAt": created,
        "hasVector": bool(vector), "vector": vector, "vectorLabel": None, "hookName": hook_name if vector else None,
        "topkCosSimIndices": [int(i) for i, _ in row["neighbours"]],
        "topkCosSimValues": [float(c) for _, c in row["neighbours"]],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [int(i) for i, _ in row["coact"]],
        "correlated_features_pearson": [], "correlated_features_l1": [float(j) for _, j in row["coact"]],
        "neg_str": [t["token"] for t in row["logit_bottom"]], "neg_values": [t["logit"] for t in row["logit_bottom"]],
        "pos_str": [t["token"] for t in row["logit_top"]], "pos_values": [t["logit"] for t in row["logit_top"]],
        "frac_nonzero": row["density"],
        "freq_hist_data_bar_heights": [int(h) for _, h in nonzero],
        "freq_hist_data_bar_values": [c for c, _ in nonzero],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
        "maxActApprox": row["max"], "vectorDefaultSteerStrength": row["max"] if vector else None}
    activations = []
    quantiles = row["quantiles"]
    for e in db.examples(f):
        if e.kind == "random" or not e.acts:
            continue
        lo, hi, share = (-1.0, -1.0, -1.0) if e.kind == "top" else (
            quantiles[e.group]["lo"], quantiles[e.group]["hi"], quantiles[e.group]["fraction"])
        top = max(e.acts)
        activations.append({
            "id": f"{sid}-{f}-{e.kind}-{e.group}-{e.position}", "tokens": e.texts, "modelId": model, "layer": sid,
            "index": f, "maxValue": top, "maxValueTokenIndex": e.acts.index(top), "minValue": min(e.acts),
            "values": e.acts, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "creatorId": CREATOR,
            "createdAt": created, "lossValues": [], "logitContributions": None, "binMin": lo, "binMax": hi,
            "binContains": share, "qualifyingTokenIndex": e.center, "dataIndex": None, "dataSource": None})
    return feature, activations
