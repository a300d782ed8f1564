"""The gloo jobs behind the planner's tests, spawned once per test session and shared by the three modules
(tests/distributed/test_plan_memory.py, test_plan_schedule.py, test_plan_activations.py; each owns its worker).

A spawned process costs a torch and gpt3d import (~3 CPU-seconds on the CI machine), far more than any
one check, so one 4-process job runs every world-4 check in turn: the bytes each rank holds after a real
training step under each layout (test_plan_memory), the real pipeline schedules' record
(test_plan_schedule) and the tensor-parallel saved-tensor census (test_plan_activations). The 3D layout
(TP2 x PP2 x DP2) needs its own 8-process job.
"""
from __future__ import annotations

import functools

from tests.support import distributed


def _parts(world: int) -> dict:
    """name -> (worker(rank, world, *args), args) for every check run at `world`."""
    from tests.distributed.test_plan_activations import TP_CASES, tp_worker
    from tests.distributed.test_plan_memory import LAYOUTS, held_worker
    from tests.distributed.test_plan_schedule import CASES, record_worker
    parts = {"memory": (held_worker, (LAYOUTS[world],))}
    if world == 4:
        parts.update(schedule=(record_worker, (CASES,)), tp_activations=(tp_worker, (TP_CASES,)))
    return parts


def _run_parts(rank: int, world: int, parts: dict) -> dict:
    return {name: worker(rank, world, *args) for name, (worker, args) in parts.items()}


@functools.cache
def _job(world: int) -> list:
    return distributed.run(world, _run_parts, _parts(world))


def per_rank(world: int, part: str) -> list:
    """Each rank's result of check `part` in the shared `world`-process job."""
    return [r[part] for r in _job(world)]
