"""Training: state and steps, optimizer, checkpoints, metrics, data parallelism, the loop."""

from mpq.train.loop import compile_count, evaluate_checkpoint, train_and_evaluate

__all__ = ["compile_count", "evaluate_checkpoint", "train_and_evaluate"]
