"""ResNet-20 for CIFAR-size inputs (He et al. 2016, section 4.2), also on 28x28x1.

stem 3x3x16, then 3 stages of 3 basic blocks with 16/32/64 channels (stride 2 at the start of stages
2 and 3), global average pooling and a dense head. A basic block is conv1-BN-ReLU-conv2-BN, plus the
shortcut (identity, or a 1x1 conv + BN projection where the shape changes: option B), then ReLU.
Layer paths: `stem`, `stage{s}/block{b}/conv1|conv2|shortcut|add`, `pool`, `head`.
"""

from flax import nnx


class BasicBlock(nnx.Module):

  def __init__(self, path, in_ch, out_ch, stride, layers, *, rngs):
    self.conv1 = layers.conv_bn(f"{path}/conv1", in_ch, out_ch, 3, stride, signed_input=False,
                                activation="relu", rngs=rngs)
    self.conv2 = layers.conv_bn(f"{path}/conv2", out_ch, out_ch, 3, 1, signed_input=False, rngs=rngs)
    if stride != 1 or in_ch != out_ch:
      self.shortcut = layers.conv_bn(f"{path}/shortcut", in_ch, out_ch, 1, stride,
                                     signed_input=False, rngs=rngs)
    else:
      self.shortcut = None
    self.add = layers.add(f"{path}/add", activation="relu")

  def __call__(self, x, train=False):
    y = self.conv1(x, train)
    y = self.conv2(y, train)
    s = x if self.shortcut is None else self.shortcut(x, train)
    return self.add(y, s, train)


class Stage(nnx.Module):

  def __init__(self, path, in_ch, out_ch, num_blocks, stride, layers, *, rngs):
    self.num_blocks = num_blocks
    for b in range(num_blocks):
      setattr(self, f"block{b}", BasicBlock(f"{path}/block{b}", in_ch if b == 0 else out_ch, out_ch,
                                            stride if b == 0 else 1, layers, rngs=rngs))

  def __call__(self, x, train=False):
    for b in range(self.num_blocks):
      x = getattr(self, f"block{b}")(x, train)
    return x


class ResNet(nnx.Module):

  def __init__(self, num_classes, image_shape, layers, *, rngs, depth=20, width=16):
    if (depth - 2) % 6:
      raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    self.stem = layers.conv_bn("stem", image_shape[-1], width, 3, 1, signed_input=True,
                               activation="relu", rngs=rngs)
    c = width
    for s, mult in enumerate((1, 2, 4), start=1):
      setattr(self, f"stage{s}", Stage(f"stage{s}", c, width * mult, n, 1 if s == 1 else 2, layers,
                                       rngs=rngs))
      c = width * mult
    self.pool = layers.avg_pool("pool")
    self.head = layers.dense("head", c, num_classes, signed_input=False, rngs=rngs)

  def __call__(self, x, train=False):
    x = self.stem(x, train)
    x = self.stage3(self.stage2(self.stage1(x, train), train), train)
    return self.head(self.pool(x, train), train)
