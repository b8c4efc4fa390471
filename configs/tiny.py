"""Tiny config for tests and smoke runs: the CNN at quarter width on 2,048 Fashion-MNIST images.

Command:  python train.py --config=configs/tiny.py --workdir=/tmp/mpq_tiny
Runtime:  about 11 s on 2 CPU cores (64 steps, much of it compilation).
Result:   77.5% test accuracy on the first 1,000 test images (measured 2026-11-23 with the
          max-pool CNN; chance is 10%; a smoke test, not a model).
"""

from mpq.config import base_config


def get_config():
  c = base_config()
  c.model = "cnn"
  c.model_kwargs.width = 0.25
  c.num_train_examples = 2048
  c.num_test_examples = 1000
  c.batch_size = 64
  c.eval_batch_size = 250
  c.num_train_steps = 64
  c.learning_rate = 3e-3
  c.log_every = 16
  c.eval_every = 32
  c.checkpoint_every = 32
  return c
