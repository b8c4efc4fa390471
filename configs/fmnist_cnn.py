"""Float CNN on Fashion-MNIST (the demo's model).

Command:  python train.py --config=configs/fmnist_cnn.py --workdir=workdirs/fmnist_cnn
Runtime:  about 70 s per epoch on 2 CPU cores alone (about 900 img/s), so about 18 minutes for the
          15 epochs; measured 31 minutes while a second training job shared the two cores.
Result:   93.10% test accuracy (15 epochs, measured 2026-11-23). `make demo` runs 5 epochs of this
          config without augmentation: see the README for its measured figure.
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
