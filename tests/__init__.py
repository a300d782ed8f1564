"""gpt3d's test suite, a package so that helpers and spawned workers import by one dotted name.

    unit/         one piece of gpt3d at a time, in one process: model, layers, data, tokenizers, optimizer,
                  schedules, checkpoint parts, errors
    distributed/  several gloo ranks against one process: every parallel layout, tensor-parallel layers,
                  resharding, and the planner's predictions against real ranks
    end_to_end/   the `gpt3d` commands as a user runs them: configs and launch scripts, train / resume /
                  eval / export, `plan`, `plot`, and every fault in docs/faults.md's "Faults tried" table
    support/      helpers the tests share (imported as `from tests.support import curves`)
    conftest.py   the fixtures tests build for themselves: generated text and the tokenizers trained on it

Workers that `tests.support.distributed` spawns are pickled by module name (`tests.distributed.test_x.fn`),
so the child finds them through the repository root that pytest puts on `sys.path` (and passes on).
"""
