"""`gpt3d plan`: memory per GPU and step time of every parallel layout, predicted before the job starts.

layout (candidate layouts), memory (bytes per rank, term by term), schedule (pipeline
order, micro-batches in flight, bubble), timing (step time), presets (GPUs,
interconnects, measured kernel speeds), calibrate (measure them on this GPU),
search (predict / plan), cli (the command), fits (sizes no memory holds, refused by `gpt3d train`).
"""
from .layout import Layout, layout_of
from .presets import Calibration, Gpu, resolve_gpu
from .search import Prediction, check_memory, plan, predict

__all__ = ["Calibration", "Gpu", "Layout", "Prediction", "check_memory", "layout_of", "plan", "predict",
           "resolve_gpu"]
