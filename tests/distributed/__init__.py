"""Several gloo ranks on CPU against one process: parallel layouts, TP layers, resharding, the planner vs real ranks."""
