"""Explaining features: the offline pattern explainer (``patterns``); LLM explainers, scores,
human labels and concept search follow (issue 15)."""
