"""Float CNN on Fashion-MNIST (the demo's model).

Command:  python train.py --config=configs/fmnist_cnn.py --workdir=workdirs/fmnist_cnn
Runtime:  about 2 minutes per epoch on 2 CPU cores (450-550 img/s; 15 epochs, about 30 minutes).
Result:   measured 2026-11-23 with the demo's shortened schedule (`make demo`: 3 epochs,
          warmup_steps=50): 89.47% test accuracy in 7.4 minutes (the machine was also running the
          test suite). The full 15-epoch schedule has not been measured yet.
"""

from mpq.config import base_config


def get_config():
  c = base_config()
  c.model = "cnn"
  c.batch_size = 128
  c.num_epochs = 15.0
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.warmup_steps = 200
  c.weight_decay = 0.05
  c.augment = "flip"
  c.log_every = 100
  return c
