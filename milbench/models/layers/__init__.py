"""Shared layers, one concept per module: attention, Nystrom attention, pooling, position encoding, segment
operations, top-k selection, clustering, and the common ends (output type, hazard head)."""
