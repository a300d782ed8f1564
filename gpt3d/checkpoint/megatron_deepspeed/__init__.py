"""Continuing a Megatron-DeepSpeed run: its DeepSpeed checkpoints read safely and written as gpt3d's.

    unpickle   the .pt files through torch's weights-only unpickler: tensors, arrays, plain containers, stand-ins
               for the few megatron/deepspeed classes they name; nothing else is ever resolved or called
    source     which files a global_stepN directory holds (either engine), the run's args, each shard's rank
    names      Megatron-DeepSpeed parameter names and TP-local layouts -> gpt3d's, as element ranges
    convert    one shard's files -> one gpt3d shard file (weights; ZeRO partitions -> parameter space)
    settings   the run's settings from its args, ds_config and optimizer groups; what gpt3d refuses
    importer   the whole checkpoint through gpt3d's save sequence: `train --load MDS --save NEW` (every rank
               converts a share) and `gpt3d checkpoint import-megatron-deepspeed` (one process)

A converted checkpoint is an ordinary gpt3d checkpoint at the saved run's layout; gpt3d's reshard code loads
it at any other, so nothing here knows about the layout the run continues at.
"""
from .importer import apply_settings, check_save_dir, import_checkpoint, import_for_run
from .source import Checkpoint, is_checkpoint

__all__ = ["Checkpoint", "is_checkpoint", "apply_settings", "check_save_dir", "import_for_run", "import_checkpoint"]
