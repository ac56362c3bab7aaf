"""Data layer: feature readers, patient bags, the per-model extras (graphs, cross-scale index), caches."""
