"""Look inside an SAE: per-feature statistics and examples from one pass over a text, logit
lens, nearest features, search, and matching of two dictionaries. Results go to a feature
database on disk (:mod:`dictlens.analysis.db`) that the report and the web app read."""

from dictlens.analysis.collect import AnalysisConfig, AnalysisResult, analyze
from dictlens.analysis.db import FeatureDB

__all__ = ["AnalysisConfig", "AnalysisResult", "FeatureDB", "analyze"]
