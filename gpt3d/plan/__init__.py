"""`gpt3d plan`: memory per GPU and step time of every parallel layout, predicted before the job starts.

layout (candidate layouts, from parallel/layout.py's rules), memory (bytes per rank, term by term; the
parameter list from the meta-device model, the buckets from optim/buckets.py), schedule (micro-batches in
flight and the bubble, from parallel/pipeline.py's op table), timing (step time), presets (GPUs, interconnects,
measured kernel speeds; the default calibration is the package data calibration.json), calibrate (measure them
on this GPU), search (predict / plan), advice (train's start-up suggestion, --auto-tune-layout), fits (sizes no
memory holds, refused by `gpt3d train`). The command itself is gpt3d/commands/plan.py.
"""
from .layout import Candidate, layout_of
from .presets import Calibration, Gpu, resolve_gpu
from .search import Prediction, check_memory, plan, predict

__all__ = ["Calibration", "Candidate", "Gpu", "Prediction", "check_memory", "layout_of", "plan", "predict",
           "resolve_gpu"]
