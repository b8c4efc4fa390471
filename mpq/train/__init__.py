"""Training: state and steps, optimizer, checkpoints, metrics, data parallelism, the loop; the
experiment orchestrator that composes a run is `mpq.experiment`."""

from mpq.train.loop import compile_count, evaluate_checkpoint, fit

__all__ = ["compile_count", "evaluate_checkpoint", "fit"]
