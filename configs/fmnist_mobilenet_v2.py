"""Float MobileNetV2 (width 0.35) on Fashion-MNIST (28x28x1).

Command:  python train.py --config=configs/fmnist_mobilenet_v2.py --workdir=workdirs/fmnist_mobilenet_v2
Runtime:  measured 2026-12-02 while other jobs shared the 2 CPU cores: see benchmarks/results/
          deploy.json's `mobilenet_v2_fp32_seconds`; 9.7M MACs per image (ResNet-20: 31M), but its
          depthwise convolutions run slowly on CPU.
Result:   see benchmarks/results/deploy.json (`mobilenet_v2_fp32_accuracy`).

Inverted residual blocks with depthwise convs and residual additions (`mpq.models.mobilenet`): the
deployment and mixed-precision benchmarks' third architecture. The recipe is ResNet-20's (SGD with
Nesterov momentum 0.9 at 0.1, 200 warm-up steps, cosine, L2 5e-4, random crops), 5 epochs.
"""

from mpq.config import base_config


def get_config():
  c = base_config()
  c.model = "mobilenet_v2"
  c.model_kwargs.width = 0.35
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
