"""Optimization: DP gradient buffer (grad_buffer), ZeRO stage 0/1 AdamW (zero), LR schedule (lr_schedule),
bucket layout shared with the planner (buckets),
fp16 loss scaling (grad_scaler)."""
