"""Which features cause a behaviour: attribution patching, checked by real ablation, and
feature-to-feature edges between SAEs at several hooks (sparse feature circuits).

For a metric m of the model's output on a prompt (a token's logit or log-probability,
a logit difference, the loss), one forward and one backward pass give the gradient g_h =
∂m/∂x_h at every hooked activation. With x_h = Σ_i f_i W_dec[i] + b_dec + e (codes f of
the SAE at h, error e = x − x̂), the attribution of feature i at h is its linear share of
m (Syed et al., attribution patching; Marks et al., sparse feature circuits):

    A_i = Σ_t f_i(t) · (W_dec[i] · g_h(t))       ≈ m − m(with f_i = 0)

and A_error = Σ_t e(t) · g_h(t). The top features are then checked by real ablation: the
forward pass rerun with f_i zeroed (error term kept, nothing else changes), and
m − m_ablated reported beside A_i.

Edges: for hooks a before b and a downstream feature d at b, let
s_d = Σ_t f_d(t) (W_dec[d] · g_b(t)) (its attribution, with g_b held fixed); the edge from
an upstream feature u at a is the linear effect of u on s_d through the model,

    E(u → d) = Σ_t f_u(t) · (W_dec[u] · ∂s_d/∂x_a(t)),

one backward pass per downstream feature. Edges are computed between consecutive hooks.
Special tokens and activations above the SAE's training outlier limit carry no codes:
their whole activation counts as ``untouched``. The features outside the listed top
ones are summed as ``rest``, so that every hook's nodes add up to Σ_t x(t)·g_h(t).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dictlens.data.hooks import named_hooks, replaced, resolve_hook
from dictlens.errors import ConfigError, InputError
from dictlens.io import atomic_write_bytes
from dictlens.use.splice import Edit, Splice

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE

MetricKind = Literal["logit", "logprob", "logit_diff", "loss"]


@dataclass(frozen=True)
class Metric:
    """What to explain: at the last position (``position``), the logit or log-probability
    of ``tokens[0]``, the logit difference ``tokens[0]`` − ``tokens[1]``, or the mean
    next-token loss of the prompt."""

    kind: MetricKind
    tokens: tuple[int, ...] = ()
    position: int = -1
    label: str = ""

    def __post_init__(self) -> None:
        need = {"logit": 1, "logprob": 1, "logit_diff": 2, "loss": 0}
        if self.kind not in need:
            raise ConfigError(f"metric {self.kind!r}: expected one of {', '.join(need)}")
        if len(self.tokens) != need[self.kind]:
            raise ConfigError(f"metric {self.kind}: expected {need[self.kind]} token(s), found {len(self.tokens)}")

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """m from ``logits`` [1, T, V] of ``ids`` [1, T]."""
        last = logits[0, self.position].float()
        if self.kind == "logit":
            return last[self.tokens[0]]
        if self.kind == "logprob":
            return last.log_softmax(-1)[self.tokens[0]]
        if self.kind == "logit_diff":
            return last[self.tokens[0]] - last[self.tokens[1]]
        scored = keep[0, :-1] & keep[0, 1:]
        if not bool(scored.any()):
            raise InputError("metric loss: the prompt has no next-token prediction to score")
        logp = logits[0, :-1].float().log_softmax(-1)
        return -logp[scored].gather(1, ids[0, 1:][scored][:, None]).mean()


def make_metric(lm: LoadedModel, kind: str, tokens: Sequence[str] = ()) -> Metric:
    from dictlens.use.ablate import token_ids

    kind = kind.replace("-", "_")
    metric = Metric(kind, tuple(token_ids(lm, tokens)))  # type: ignore[arg-type]
    label = {"logit": "logit({})", "logprob": "log p({})", "logit_diff": "logit({}) − logit({})",
             "loss": "loss"}[kind].format(*(repr(t) for t in tokens))
    return Metric(metric.kind, metric.tokens, label=label)


@dataclass
class Node:
    """A feature (or the ``rest`` of the features, ``error``, ``bias``, ``untouched``) at a hook."""

    hook: str
    feature: int | str
    attribution: float
    activation: float = 0.0        # largest code on the prompt
    position: int = -1             # where its share of the attribution is largest
    token: str = ""
    ablation: float | None = None  # m − m(feature zeroed), when checked


@dataclass
class Edge:
    hook_up: str
    up: int | str
    hook_down: str
    down: int
    weight: float


@dataclass
class Attribution:
    prompt: str
    metric: str
    value: float                       # m on the clean model
    nodes: dict[str, list[Node]]       # per hook, features by |attribution|, then rest, error, bias, untouched
    edges: list[Edge] = field(default_factory=list)
    total: dict[str, float] = field(default_factory=dict)   # Σ x·g per hook (what the nodes add up to)

    def checked(self) -> list[Node]:
        return [n for ns in self.nodes.values() for n in ns if n.ablation is not None]

    def agreement(self) -> dict[str, float]:
        """How attribution predicted real ablation over the checked features: the share with
        the same sign, and Pearson's r."""
        nodes = self.checked()
        if not nodes:
            return {}
        a = torch.tensor([n.attribution for n in nodes], dtype=torch.float64)
        b = torch.tensor([n.ablation for n in nodes], dtype=torch.float64)
        same = float(((a > 0) == (b > 0)).double().mean())
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(nodes) > 2 else float("nan")
        return {"checked": len(nodes), "same_sign": same, "pearson_r": r}

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "metric": self.metric, "value": self.value,
                "nodes": {h: [asdict(n) for n in ns] for h, ns in self.nodes.items()},
                "edges": [asdict(e) for e in self.edges], "total": self.total, "agreement": self.agreement()}


# ---- the forward pass with gradients at every hook ------------------------------------

@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (only activations' are wanted), restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _captured_forward(lm: LoadedModel, hooks: Sequence[str], ids: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``ids`` with each hooked activation kept in the autograd graph [T, D]."""
    acts: dict[str, torch.Tensor] = {}

    def keeper(hook: str) -> Any:
        def fn(x: torch.Tensor) -> torch.Tensor:
            if not x.requires_grad:    # the first hook: the graph starts here
                x = x.detach().requires_grad_(True)
            else:
                x.retain_grad()
            acts[hook] = x
            return x
        return fn

    with ExitStack() as stack:
        for h in hooks:
            stack.enter_context(replaced(lm.model, resolve_hook(lm.model, h), keeper(h)))
        logits = lm.model(input_ids=ids, use_cache=False).logits
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise InputError(f"attribution: hooks {missing} did not fire")
    return logits, acts


def forward_order(model: torch.nn.Module, hooks: Sequence[str]) -> list[str]:
    """``hooks`` sorted by where they fire in the forward pass."""
    named = list(named_hooks(model))
    modules = [name for name, _ in model.named_modules()]

    def key(h: str) -> tuple[int, int]:
        if h in named:
            return (0, named.index(h))
        p = resolve_hook(model, h)
        return (1, modules.index(p.module))
    if any(h not in named for h in hooks) and any(h in named for h in hooks):
        raise ConfigError("attribution: mix named hooks or module paths, not both (their order is unclear)")
    return sorted(hooks, key=key)


@dataclass
class _HookCodes:
    rows: torch.Tensor     # position of each active pair (into the prompt)
    cols: torch.Tensor     # its feature
    vals: torch.Tensor     # its code
    kept: torch.Tensor     # [T] positions with codes
    x_hat: torch.Tensor    # [T, D] reconstruction at kept positions (x elsewhere)


def _codes(sae: SAE, x: torch.Tensor, kept: torch.Tensor) -> _HookCodes:
    where = kept.nonzero()[:, 0]
    with torch.no_grad(), sae.ranking("float32"):
        p, vals = sae.encode_sparse(x[where].float().to(sae.device))
        x_hat = x.detach().float().clone().to(sae.device)
        if len(where):
            x_hat[where.to(sae.device)] = sae.decode_sparse(p, vals)
    return _HookCodes(where.to(sae.device)[p.rows], p.cols, vals, kept.to(sae.device), x_hat)


def _node_table(hook: str, sae: SAE, c: _HookCodes, x: torch.Tensor, g: torch.Tensor, tokens: list[str],
                top: int) -> tuple[list[Node], float]:
    W = sae.W_dec.detach()
    g = g.float().to(sae.device)
    x = x.detach().float().to(sae.device)
    per_pair = c.vals * (g[c.rows] * W[c.cols]).sum(-1)
    F = sae.n_features
    by_feature = torch.zeros(F, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, c.cols, per_pair)
    fired = torch.unique(c.cols)
    order = fired[by_feature[fired].abs().argsort(descending=True)][:top]
    nodes = []
    for f in order.tolist():
        pairs = (c.cols == f).nonzero()[:, 0]
        best = pairs[per_pair[pairs].abs().argmax()]
        t = int(c.rows[best])
        nodes.append(Node(hook, int(f), float(by_feature[f]), float(c.vals[pairs].max()), t, tokens[t]))
    kept = c.kept
    err = float(((x - c.x_hat) * g)[kept].sum())
    b_dec = (sae.b_dec / sae.input_scale).detach().float()   # raw units (a model fresh from training is not folded)
    bias = float((g[kept] @ b_dec).sum()) if bool(kept.any()) else 0.0
    rest = float(by_feature.sum()) - sum(n.attribution for n in nodes)
    untouched = float((x * g)[~kept].sum())
    nodes += [Node(hook, "rest", rest), Node(hook, "error", err), Node(hook, "bias", bias),
              Node(hook, "untouched", untouched)]
    return nodes, float((x * g).sum())


def _edges(lm: LoadedModel, up: str, down: str, saes: Mapping[str, SAE], acts: dict[str, torch.Tensor],
           codes: dict[str, _HookCodes], nodes: dict[str, list[Node]], n_down: int) -> list[Edge]:
    sa, sb = saes[up], saes[down]
    xa, xb = acts[up], acts[down]
    ga_dec = sa.W_dec.detach()
    ca, cb = codes[up], codes[down]
    gb = xb.grad[0].detach().float().to(sb.device)  # type: ignore[index]
    ups = [n for n in nodes[up] if isinstance(n.feature, int)]
    downs = [n for n in nodes[down] if isinstance(n.feature, int)][:n_down]
    where = cb.kept.nonzero()[:, 0]
    with sb.ranking("float32"):   # the downstream codes again, now as functions of x_a
        codes_b = sb.encode_codes(xb[0][where.to(xb.device)].float().to(sb.device) * sb.input_scale)
    rows_b = where.to(sb.device)[codes_b.pattern.rows]
    x_a = xa[0].detach().float().to(sa.device)
    edges: list[Edge] = []
    for d in downs:
        hit = codes_b.pattern.cols == d.feature
        rows = rows_b[hit]
        f_d = codes_b.vals[hit] / sb.input_scale
        s = (f_d * (gb[rows] @ sb.W_dec.detach()[int(d.feature)])).sum()
        if not s.requires_grad:
            continue
        (grad_a,) = torch.autograd.grad(s, xa, retain_graph=True, allow_unused=True)
        if grad_a is None:
            continue
        grad_a = grad_a[0].float().to(sa.device)
        per_pair = ca.vals * (grad_a[ca.rows] * ga_dec[ca.cols]).sum(-1)
        for u in ups:
            w = float(per_pair[ca.cols == u.feature].sum())
            edges.append(Edge(up, u.feature, down, int(d.feature), w))
        edges.append(Edge(up, "error", down, int(d.feature), float(((x_a - ca.x_hat) * grad_a)[ca.kept].sum())))
    return edges


def attribute(lm: LoadedModel, saes: Mapping[str, SAE], prompt: str, metric: Metric, *, top: int = 20, check: int = 10,
              edges: int = 10, max_norm: Mapping[str, float | None] | None = None) -> Attribution:
    """Rank the features of ``saes`` ({hook: SAE}) by their attribution to ``metric`` on
    ``prompt``; check the ``check`` strongest per hook by real zero ablation; with two or
    more hooks, edges from the ``top`` features of each hook to the ``edges`` strongest of
    the next."""
    from dictlens.data.tokens import not_special, text_ids

    if not saes:
        raise ConfigError("attribution: give at least one SAE")
    hooks = forward_order(lm.model, list(saes))
    ids = text_ids(lm, prompt, what="prompt")
    keep = not_special(lm.tokenizer, ids)
    tokens = [lm.tokenizer.decode([i]) for i in ids[0].tolist()]
    limits = dict(max_norm or {})
    with _frozen(lm.model), torch.enable_grad():
        logits, acts = _captured_forward(lm, hooks, ids)
        m = metric(logits, ids, keep)
        m.backward(retain_graph=len(hooks) > 1)
        codes, nodes, total = {}, {}, {}
        for h in hooks:
            x = acts[h][0]
            kept = keep[0].clone()
            if limits.get(h) is not None:
                kept &= x.detach().float().norm(dim=1) <= float(limits[h])  # type: ignore[arg-type]
            if x.shape[-1] != saes[h].d_in:
                raise InputError(f"attribution: {h} is {x.shape[-1]} wide, its SAE reads {saes[h].d_in}")
            codes[h] = _codes(saes[h], x, kept)
            nodes[h], total[h] = _node_table(h, saes[h], codes[h], x, acts[h].grad[0], tokens, top)  # type: ignore[index]
        found: list[Edge] = []
        for up, down in zip(hooks[:-1], hooks[1:], strict=True):
            found += _edges(lm, up, down, saes, acts, codes, nodes, edges)
    value = float(m.detach())
    with torch.no_grad():
        for h in hooks:
            for n in [n for n in nodes[h] if isinstance(n.feature, int)][:check]:
                with Splice(lm, {h: saes[h]}, {h: [Edit(int(n.feature), "zero")]}, max_norm=limits.get(h)):
                    ablated = metric(lm.model(input_ids=ids, use_cache=False).logits, ids, keep)
                n.ablation = value - float(ablated)
    return Attribution(prompt, metric.label or metric.kind, value, nodes, found, total)


# ---- output ---------------------------------------------------------------------------

def plot_graph(result: Attribution, path: str | Path, labels: Mapping[tuple[str, int | str], str] | None = None,
               n: int = 8) -> Path:
    """A layered graph: one column per hook, its ``n`` strongest features (circle area ∝
    |attribution|; orange raises the metric, blue lowers it), edges between consecutive
    hooks (width ∝ |weight|). ``labels``: text beside each node, e.g. logit-lens tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(result.nodes)
    cols = {h: [nd for nd in result.nodes[h] if isinstance(nd.feature, int)][:n] for h in hooks}
    place = {(h, nd.feature): (i, -j) for i, h in enumerate(hooks) for j, nd in enumerate(cols[h])}
    biggest = max([abs(nd.attribution) for c in cols.values() for nd in c] or [1.0]) or 1.0
    fig, ax = plt.subplots(figsize=(3.2 * max(len(hooks), 1) + 1.5, 0.7 * n + 1.8))
    shown = [e for e in result.edges if (e.hook_up, e.up) in place and (e.hook_down, e.down) in place]
    heaviest = max([abs(e.weight) for e in shown] or [1.0]) or 1.0
    for e in shown:
        (x0, y0), (x1, y1) = place[(e.hook_up, e.up)], place[(e.hook_down, e.down)]
        ax.plot([x0, x1], [y0, y1], color="#c2410c" if e.weight > 0 else "#1d4ed8",
                lw=0.3 + 4 * abs(e.weight) / heaviest, alpha=0.25 + 0.6 * abs(e.weight) / heaviest, zorder=1)
    for h in hooks:
        for nd in cols[h]:
            x, y = place[(h, nd.feature)]
            area = 60 + 900 * abs(nd.attribution) / biggest     # points²
            ax.scatter([x], [y], s=area, zorder=2,
                       color="#ea580c" if nd.attribution > 0 else "#3b82f6", edgecolor="#111", linewidth=0.5)
            text = f"{nd.feature}  {nd.attribution:+.3g}"
            if labels and (h, nd.feature) in labels:
                text += f"\n{labels[(h, nd.feature)]}"
            ax.annotate(text, (x, y), xytext=(area ** 0.5 / 2 + 4, 0), textcoords="offset points", va="center",
                        fontsize=7.5, zorder=3, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                                      "alpha": 0.8})
    ax.set_xticks(range(len(hooks)), hooks)
    ax.set_yticks([])
    ax.set_xlim(-0.4, len(hooks) - 0.2)
    ax.set_ylim(-n + 0.4, 0.8)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{result.metric} = {result.value:.3g} on {result.prompt[:60]!r}", fontsize=9)
    buf = io.BytesIO()
    with warnings.catch_warnings():      # a token outside the font's glyphs is drawn as a box: fine
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
