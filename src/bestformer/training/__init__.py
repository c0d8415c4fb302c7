"""Training: engine, losses, distillation and checkpoints."""

from .checkpoint import load_checkpoint, load_weights, read_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "load_weights", "read_checkpoint", "save_checkpoint"]
