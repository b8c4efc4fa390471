"""Float MobileNetV2 (width 0.35) on Fashion-MNIST (28x28x1), with ResNet-20's recipe.

Command:  python train.py --config=configs/fmnist_mobilenet_v2.py --workdir=workdirs/fmnist_mobilenet_v2
Runtime:  not measured yet (9.7M MACs per image against ResNet-20's 31M, but its depthwise
          convolutions run slowly on CPU).
Result:   not measured yet.

Inverted residual blocks with depthwise convs and residual additions (`mpq.models.mobilenet`): the
deployment and mixed-precision benchmarks' third architecture. The recipe is
`configs/fmnist_resnet20.py`'s (SGD with Nesterov momentum 0.9 at 0.1, 200 warm-up steps, cosine,
L2 5e-4, random crops, 5 epochs).
"""

from configs import fmnist_resnet20


def get_config():
  c = fmnist_resnet20.get_config()
  c.model = "mobilenet_v2"
  c.model_kwargs.width = 0.35
  return c
