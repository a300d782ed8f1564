"""Configuration: what settings exist (schema), how YAML, flags and saved configs become them (values), which
values a run accepts (rules), the whole `Config` (root); also Megatron-DeepSpeed's ds_config.json (deepspeed),
the flags generated from the schema (flags) and the one loader of a command's settings (load).
Importers take the config classes and readers from here."""
from .root import Config
from .schema import (DEFAULT_VOCAB_SIZE, SECTIONS, CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig,
                     ParallelConfig, PrecisionConfig, SchedulerConfig, Sections, TrainingConfig, flag_name)
from .values import apply_flat, apply_layer, field_index, field_types, flatten, optional_fields, read_settings_file

__all__ = ["Config", "Sections", "DEFAULT_VOCAB_SIZE", "SECTIONS", "CheckpointConfig", "DataConfig", "ModelConfig",
           "OptimizerConfig", "ParallelConfig", "PrecisionConfig", "SchedulerConfig", "TrainingConfig", "flag_name",
           "apply_flat", "apply_layer", "field_index", "field_types", "flatten", "optional_fields",
           "read_settings_file"]
