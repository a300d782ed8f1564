"""Using a trained checkpoint: load it for inference, score held-out tokens (eval), sample text (generate)."""
