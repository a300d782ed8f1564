"""Parallelism: the process layout (state), TP communication ops (mappings), TP layers (layers),
vocab-parallel loss (cross_entropy), TP-aware randomness (random), pipeline schedules (pipeline)."""
