"""A scikit-learn-style estimator over the trainer, for arrays.

    est = SAEEstimator(activation="topk", k=8, n_features=256, tokens=200_000).fit(X)
    codes = est.transform(X)            # [N, F] numpy
    X_hat = est.inverse_transform(codes)
Fitted attributes end in ``_``: ``sae_``, ``components_`` (unit decoder rows, [F, D]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dictlens.config import from_dict
from dictlens.data.store import ArraySource
from dictlens.errors import ConfigError
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE
from dictlens.train.config import TrainConfig
from dictlens.train.trainer import train


class SAEEstimator:
    """Keyword arguments are fields of :class:`SAEConfig` or :class:`TrainConfig`."""

    def __init__(self, **params: Any):
        self.params = params
        self._split()  # fail early on a typo

    def _split(self) -> tuple[SAEConfig, TrainConfig]:
        sae_fields = set(SAEConfig.__dataclass_fields__)
        train_fields = set(TrainConfig.__dataclass_fields__)
        unknown = [k for k in self.params if k not in sae_fields | train_fields]
        if unknown:
            from dictlens.config import suggest

            raise ConfigError(f"SAEEstimator: unknown parameter {unknown[0]!r}"
                              f"{suggest(unknown[0], sorted(sae_fields | train_fields))}")
        sae = from_dict(SAEConfig, {k: v for k, v in self.params.items() if k in sae_fields})
        tr = from_dict(TrainConfig, {"plots": False, **{k: v for k, v in self.params.items() if k in train_fields}})
        return sae, tr

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return dict(self.params)

    def set_params(self, **params: Any) -> SAEEstimator:
        self.params.update(params)
        self._split()
        return self

    def fit(self, X: Any, y: Any = None) -> SAEEstimator:
        sae_cfg, train_cfg = self._split()
        self.sae_ = train(sae_cfg, train_cfg, ArraySource(X), progress=False)
        self.components_ = self.sae_.feature_directions().detach().cpu().numpy()
        return self

    def _fitted(self) -> SAE:
        if not hasattr(self, "sae_"):
            raise ConfigError("SAEEstimator: call fit(X) before transform")
        return self.sae_

    def transform(self, X: Any) -> np.ndarray:
        sae = self._fitted()
        x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=sae.device)
        with torch.no_grad():
            return sae.encode(x).cpu().numpy()

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).transform(X)

    def inverse_transform(self, F: Any) -> np.ndarray:
        sae = self._fitted()
        f = torch.as_tensor(np.asarray(F, dtype=np.float32), device=sae.device)
        with torch.no_grad():
            return sae.decode(f).cpu().numpy()
