"""Evaluation: metrics with one definition each (see docs/metrics.md)."""

from dictlens.eval.metrics import Metrics, evaluate

__all__ = ["Metrics", "evaluate"]
