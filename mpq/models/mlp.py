"""A multi-layer perceptron: flatten, `depth` hidden ReLU layers, linear head."""

from flax import nnx


class MLP(nnx.Module):

  def __init__(self, num_classes, image_shape, layers, *, rngs, width=256, depth=2):
    features = 1
    for d in image_shape:
      features *= d
    self.depth = depth
    for i in range(depth):
      setattr(self, f"dense{i}", layers.dense(f"dense{i}", features, width, signed_input=i == 0,
                                              activation="relu", rngs=rngs))
      features = width
    self.head = layers.dense("head", features, num_classes, signed_input=depth == 0, rngs=rngs)

  def __call__(self, x, train=False):  # dense layers flatten their input
    for i in range(self.depth):
      x = getattr(self, f"dense{i}")(x, train)
    return self.head(x, train)
