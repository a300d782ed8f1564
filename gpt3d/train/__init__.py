"""Training: the loop (loop.py) and the objects it hands its decisions to.

    loop.py     Trainer: builds everything from the config and sequences step, log, evaluate, save
    step.py     TrainStep (one optimizer step -> StepResult, evaluation), TrainState (the counters)
    stop.py     StopPolicy: signals, time limit, streak of non-finite steps; the same verdict on every rank
    report.py   Reporter: timing window, console / JSON lines / TensorBoard, plot at the end
    watchdog.py Watchdog: no progress within the timeout ends the rank (and the job), naming who is stuck
    rundir.py   each run's own directory (runs/<name>, -2, ...; --run-dir)
    faults.py   the GPT3D_FAULT_INJECT test hook, wrapped around the step only when it is set
    determinism.py  --deterministic-mode: the settings that make a GPU run repeat bit for bit
"""
from .loop import Trainer, main
from .step import StepResult, TrainState

__all__ = ["Trainer", "main", "StepResult", "TrainState"]
