"""Configuration: what settings exist (schema), which values a run accepts (rules), and where they come from
(YAML, flags, a DeepSpeed ds_config.json). Importers take the config classes from here."""
from .schema import (DEFAULT_VOCAB_SIZE, SECTIONS, CheckpointConfig, Config, DataConfig, ModelConfig, OptimizerConfig,
                     ParallelConfig, PrecisionConfig, SchedulerConfig, TrainingConfig, apply_flat, apply_layer,
                     field_index, field_types, flag_name, flatten, optional_fields, read_settings_file)
from .schema import ConfigError  # noqa: F401  (re-export kept until importers take it from gpt3d.errors)
