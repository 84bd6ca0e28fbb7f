"""The data layer: text → tokens → model tap → activation cache / stream."""
