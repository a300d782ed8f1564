"""Optimization: DP gradient buffer (grad_buffer), sharded ZeRO-1 AdamW (zero1), LR schedule (schedule),
fp16 loss scaling (grad_scaler)."""
