"""Data: IDX and TFDS sources, grain batching (see `pipeline`)."""

from mpq.data.pipeline import AUGMENTATIONS, eval_batches, iterate, train_dataset
from mpq.data.sources import ArraySource, Dataset, TfdsSource, load

__all__ = ["AUGMENTATIONS", "ArraySource", "Dataset", "TfdsSource", "eval_batches", "iterate", "load",
           "train_dataset"]
