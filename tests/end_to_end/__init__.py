"""The `gpt3d` commands as a user runs them, in this process or as real (torchrun) processes; faults included."""
