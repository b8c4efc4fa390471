import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mpq import models
from mpq.errors import UserError


@pytest.mark.parametrize("name,shape,n_layers", [
    ("mlp", (28, 28, 1), 3),
    ("cnn", (28, 28, 1), 8),
    ("resnet20", (28, 28, 1), 32),
    ("resnet20", (32, 32, 3), 32),
    ("mobilenet_v2", (32, 32, 3), 66),
])
def test_shapes_and_layer_paths(name, shape, n_layers):
  m = models.build(name, 7, shape)
  y = m(jnp.ones((3, *shape)), train=True)
  assert y.shape == (3, 7) and bool(jnp.all(jnp.isfinite(y)))
  table = models.layer_table(m)  # raises if a layer's name differs from its path
  assert len(table) == n_layers
  assert m(jnp.ones((2, *shape)), train=False).shape == (2, 7)


def test_resnet20_structure():
  m = models.build("resnet20", 10, (32, 32, 3))
  table = models.layer_table(m)
  convs = [p for p, l in table.items() if l.kind == "conv_bn"]
  # stem + 9 blocks x 2 convs + 2 projection shortcuts
  assert len(convs) == 1 + 18 + 2
  assert "stage2/block0/shortcut" in table and "stage1/block0/shortcut" not in table
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert 0.26e6 < n < 0.28e6  # ResNet-20 has 0.27M parameters (He et al. 2016, table 6)


def test_mobilenet_has_depthwise():
  m = models.build("mobilenet_v2", 10, (32, 32, 3))
  dw = models.layer_table(m)["block1/dw"].conv
  assert dw.feature_group_count == dw.in_features


def test_unknown_model():
  with pytest.raises(UserError, match="unknown model"):
    models.build("vgg", 10, (28, 28, 1))
