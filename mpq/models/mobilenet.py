"""MobileNetV2 (Sandler et al. 2018) at small width for CIFAR-size inputs.

Inverted residual blocks: 1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear project, with a
residual addition when stride is 1 and the channels match. The first stride-2 stages of the ImageNet
plan run at stride 1 for 32x32 inputs. Layer paths: `stem`, `block{i}/expand|dw|project|add`,
`last`, `pool`, `head`.
"""

from flax import nnx

# (expansion t, channels c, repeats n, first stride s), CIFAR variant of the paper's table 2.
PLAN = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
        (6, 320, 1, 1))


def _round(c, width):
  return max(8, int(c * width + 4) // 8 * 8)


class InvertedResidual(nnx.Module):

  def __init__(self, path, in_ch, out_ch, expand, stride, layers, *, rngs):
    hidden = in_ch * expand
    self.expand = (layers.conv_bn(f"{path}/expand", in_ch, hidden, 1, signed_input=True,
                                  activation="relu6", rngs=rngs) if expand != 1 else None)
    self.dw = layers.conv_bn(f"{path}/dw", hidden, hidden, 3, stride, groups=hidden,
                             signed_input=expand == 1, activation="relu6", rngs=rngs)
    self.project = layers.conv_bn(f"{path}/project", hidden, out_ch, 1, signed_input=False, rngs=rngs)
    self.add = layers.add(f"{path}/add") if stride == 1 and in_ch == out_ch else None

  def __call__(self, x, train=False):
    y = x if self.expand is None else self.expand(x, train)
    y = self.project(self.dw(y, train), train)
    return y if self.add is None else self.add(y, x, train)


class MobileNetV2(nnx.Module):

  def __init__(self, num_classes, image_shape, layers, *, rngs, width=0.35):
    c = _round(32, width)
    self.stem = layers.conv_bn("stem", image_shape[-1], c, 3, 1, signed_input=True,
                               activation="relu6", rngs=rngs)
    i = 0
    for t, ch, n, s in PLAN:
      out = _round(ch, width)
      for r in range(n):
        setattr(self, f"block{i}", InvertedResidual(f"block{i}", c, out, t, s if r == 0 else 1, layers,
                                                    rngs=rngs))
        c = out
        i += 1
    self.num_blocks = i
    last = _round(1280, width)
    self.last = layers.conv_bn("last", c, last, 1, signed_input=True, activation="relu6", rngs=rngs)
    self.pool = layers.avg_pool("pool")
    self.head = layers.dense("head", last, num_classes, signed_input=False, rngs=rngs)

  def __call__(self, x, train=False):
    x = self.stem(x, train)
    for i in range(self.num_blocks):
      x = getattr(self, f"block{i}")(x, train)
    x = self.last(x, train)
    return self.head(self.pool(x, train), train)
