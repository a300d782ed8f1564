"""Helpers shared by the tests; each module owns one thing:

    curves          a tiny GPT config, a trainer for it, and its training curve under any layout
    distributed     run a function on N gloo processes (CPU) and collect each rank's result
    hostile         damaging files as a hostile user would (JSON edits, cuts, bit flips), re-sealing meta.json
    mds             Megatron-DeepSpeed's reference checkpoints beside the repository and their command lines
    plan_jobs       the shared gloo jobs behind the planner's tests (one spawn per world size)
    runs            real `gpt3d train` runs for the fault tests: tiny flags, in-process or as a killable process
    schedule_trace  gpt3d's pipeline schedule traced on stage threads and timed on a simulated clock
    textgen         text and tokenizers the suite makes itself (no downloads)
    verification    docs/verification.md's table from a run; `python -m tests.support.verification --update-docs`
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository root: README, docs/, configs/, examples/, gpt3d/
