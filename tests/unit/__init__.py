"""One piece of gpt3d at a time, in one process (a few checks spawn two gloo ranks for a detail)."""
