"""Float ResNet-20 on Fashion-MNIST (28x28x1).

Command:  python train.py --config=configs/fmnist_resnet20.py --workdir=workdirs/fmnist_resnet20
Runtime:  49 minutes for the 5 epochs (9.9 min/epoch, about 100 img/s) measured 2026-11-23 while two
          to four other training jobs shared the 2 CPU cores; the run used 33 CPU-minutes (6.6 per
          epoch), so expect roughly 4-6 minutes per epoch on an idle 2-core machine (not measured).
          ResNet-20 is 31M MACs per image, 4x the CNN.
Result:   92.79% test accuracy after 5 epochs (measured 2026-11-23).
"""

from mpq.config import base_config


def get_config():
  c = base_config()
  c.model = "resnet20"
  c.batch_size = 128
  c.num_epochs = 5.0
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 0.1
  c.warmup_steps = 200
  c.weight_decay = 5e-4
  c.augment = "crop"
  c.log_every = 100
  return c
