"""The model: GPT decoder (gpt), attention with KV cache (attention), RoPE (rope), and how a process builds
its part of it (build)."""
