"""Parallelism: the run's layout and every rule about it (layout), the process groups (state), TP communication
ops (mappings), TP layers (layers), vocab-parallel loss (cross_entropy), TP-aware randomness (random), pipeline
schedules: the op table and its executor (pipeline), what each parameter is (param_meta), the float dtype of
fp32 runs (precision)."""
