"""A small conv net for 28x28 grey images (Fashion-MNIST).

conv1 3x3x32 -> conv2 3x3x64 /2 -> conv3 3x3x64 -> conv4 3x3x128 /2, each conv + BatchNorm + ReLU,
then global average pooling and a dense head (about 14.7M MACs and 0.13M parameters at 28x28).
"""

from flax import nnx

from mpq.layers import relu


class CNN(nnx.Module):
  PLAN = (("conv1", 32, 1), ("conv2", 64, 2), ("conv3", 64, 1), ("conv4", 128, 2))

  def __init__(self, num_classes, image_shape, layers, *, rngs, width=1.0):
    c = image_shape[-1]
    for i, (name, ch, stride) in enumerate(self.PLAN):
      ch = max(8, int(ch * width))
      setattr(self, name, layers.conv_bn(name, c, ch, 3, stride, signed_input=i == 0, rngs=rngs))
      c = ch
    self.pool = layers.avg_pool("pool")
    self.head = layers.dense("head", c, num_classes, signed_input=False, rngs=rngs)

  def __call__(self, x, train=False):
    for name, _, _ in self.PLAN:
      x = relu(getattr(self, name)(x, train))
    return self.head(self.pool(x, train), train)
