"""Float CNN on Fashion-MNIST (the demo's model).

Command:  python train.py --config=configs/fmnist_cnn.py --workdir=workdirs/fmnist_cnn
Runtime:  TBD
Result:   TBD
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
  c.weight_decay = 5e-4
  c.log_every = 100
  return c
