"""How well a learned dictionary recovers known features (synthetic ground truth).

With true unit directions g_1..g_G and learned unit directions l_1..l_F (decoder rows):

  MMCS = mean over true features of max_j cos(g_i, l_j)   (each may reuse a latent)
  MCC  = mean cosine over the optimal one-to-one matching (Hungarian, scipy), over the
         min(G, F) matched pairs, so duplicates and absorbed features cost
  latent precision / recall / F1: for each matched pair, the latent firing (code > 0)
         read as a prediction that the true feature is active; pooled over pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from dictlens.errors import InputError


def _unit(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().double().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosines(true: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """[G, F] cosine between every true and every learned direction."""
    if true.ndim != 2 or learned.ndim != 2 or true.shape[1] != learned.shape[1]:
        raise InputError(f"recovery: true features {list(true.shape)} and learned {list(learned.shape)} "
                         "must be [n, d] with the same d")
    return _unit(true) @ _unit(learned).T


def mmcs(true: torch.Tensor, learned: torch.Tensor) -> float:
    return float(cosines(true, learned).max(dim=1).values.mean())


def matching(true: torch.Tensor, learned: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one pairs (true index, learned index, cosine), maximising the summed cosine."""
    from scipy.optimize import linear_sum_assignment

    cos = cosines(true, learned).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return rows, cols, cos[rows, cols]


def mcc(true: torch.Tensor, learned: torch.Tensor) -> float:
    return float(matching(true, learned)[2].mean())


@dataclass
class Recovery:
    mmcs: float
    mcc: float
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def recovery(true: torch.Tensor, learned: torch.Tensor, true_codes: torch.Tensor | None = None,
             learned_codes: torch.Tensor | None = None) -> Recovery:
    """All recovery metrics; precision/recall/F1 need both code matrices ([N, G] and [N, F])."""
    rows, cols, cos = matching(true, learned)
    precision = recall = f1 = float("nan")
    if true_codes is not None and learned_codes is not None:
        if true_codes.shape[0] != learned_codes.shape[0]:
            raise InputError(f"recovery: {true_codes.shape[0]} true code rows, {learned_codes.shape[0]} learned")
        t = true_codes[:, torch.as_tensor(rows)] > 0
        p = learned_codes[:, torch.as_tensor(cols)] > 0
        tp = int((t & p).sum())
        precision = tp / max(1, int(p.sum()))
        recall = tp / max(1, int(t.sum()))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Recovery(mmcs=mmcs(true, learned), mcc=float(cos.mean()), precision=precision, recall=recall, f1=f1)
