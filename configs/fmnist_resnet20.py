"""Float ResNet-20 on Fashion-MNIST (28x28x1).

Command:  python train.py --config=configs/fmnist_resnet20.py --workdir=workdirs/fmnist_resnet20
Runtime:  not measured yet on 2 CPU cores (ResNet-20 is about 3x the CNN's MACs per image; expect
          several minutes per epoch).
Result:   not measured yet.
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
