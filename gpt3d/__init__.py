"""gpt3d: GPT pretraining with ZeRO-1, tensor and pipeline parallelism, in plain PyTorch."""
__version__ = "0.1.0"
